//! Body framing as a pure state machine: Content-Length, chunked and close-delimited
//! bodies decoded from bytes, with no I/O, so every split point can be tested.
//!
//! Data is handed out as slices of the input (no copy). Limits on chunk-size lines and
//! trailers keep a hostile peer from making us buffer or spin.

use std::fmt;

/// Longest chunk-size line we accept, extensions included (RFC 9112 sets no limit; real
/// clients send a few bytes).
pub const CHUNK_HEAD_LIMIT: usize = 4096;
/// Total trailer bytes accepted after the last chunk.
pub const TRAILER_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// A chunk size that is not hex, too long, or overflows.
    BadChunkSize,
    /// Missing CRLF after chunk data, or an over-long chunk-size line.
    BadChunkFraming,
    TrailerTooLarge,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyError::BadChunkSize => "invalid chunk size",
            BodyError::BadChunkFraming => "invalid chunked framing",
            BodyError::TrailerTooLarge => "chunked trailer too large",
        })
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Response bodies only: ends when the peer closes.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a chunk size.
    Size {
        value: u64,
        digits: u8,
        len: usize,
    },
    /// After the size: extensions or whitespace up to the line end.
    Ext {
        value: u64,
        len: usize,
        cr: bool,
        ext: bool,
    },
    Data {
        remaining: u64,
    },
    /// Expecting the CRLF after chunk data.
    DataCr,
    DataLf,
    /// Trailer section: `line_len` bytes into the current line.
    Trailer {
        line_len: usize,
        total: usize,
        cr: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length { remaining: u64 },
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: State,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length { remaining: n },
            Framing::Chunked => State::Chunked(Chunk::SIZE_LINE),
            Framing::UntilClose => State::UntilClose,
        };
        BodyDecoder { state }
    }

    /// The body has ended; bytes after it belong to the next message.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the peer closing now ends the body cleanly.
    pub fn eof_is_clean(&self) -> bool {
        matches!(self.state, State::Done | State::UntilClose)
    }

    /// Decodes from `input`, calling `on_data` with each slice of body data. Returns how
    /// many bytes were consumed; stops at the end of the body.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<usize, BodyError> {
        self.decode_framed(input, |data, _| on_data(data))
    }

    /// `decode`, also handing out, with the data of a chunk that lies whole in `input`
    /// (its size line plain hex, no extension), the chunk as framed: size line, data and
    /// CRLF. A relay to a chunked caller forwards those bytes as they are instead of
    /// framing the data again.
    pub fn decode_framed(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8], Option<&[u8]>),
    ) -> Result<usize, BodyError> {
        let mut i = 0;
        while i < input.len() {
            // A whole chunk-size line (with the CRLF that ended the chunk before it)
            // read at once: what `framing_byte` reads byte by byte, in one step.
            if let State::Chunked(c @ (Chunk::DataCr | Chunk::Size { len: 0, .. })) = self.state
                && let Some((size, n)) = size_line(&input[i..], c == Chunk::DataCr)
            {
                let line = i + if c == Chunk::DataCr { 2 } else { 0 };
                i += n;
                let end = (size as usize)
                    .checked_add(i)
                    .filter(|&e| size > 0 && input.get(e..e.saturating_add(2)) == Some(b"\r\n"));
                if let Some(end) = end {
                    // The whole chunk is here: its data, then what ends it.
                    on_data(&input[i..end], Some(&input[line..end + 2]));
                    i = end + 2;
                    self.state = State::Chunked(Chunk::SIZE_LINE);
                    continue;
                }
                self.state = State::Chunked(Chunk::after_size(size));
                continue;
            }
            match &mut self.state {
                State::Done => break,
                State::UntilClose => {
                    on_data(&input[i..], None);
                    i = input.len();
                }
                State::Length { remaining } => {
                    let n = (*remaining).min((input.len() - i) as u64) as usize;
                    on_data(&input[i..i + n], None);
                    i += n;
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.state = State::Done;
                    }
                }
                State::Chunked(Chunk::Data { remaining }) => {
                    let n = (*remaining).min((input.len() - i) as u64) as usize;
                    on_data(&input[i..i + n], None);
                    i += n;
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.state = State::Chunked(Chunk::DataCr);
                    }
                }
                State::Chunked(c) => match c.framing_byte(input[i])? {
                    Byte::Taken => i += 1,
                    Byte::Kept => {}
                    Byte::Last => {
                        i += 1;
                        self.state = State::Done;
                    }
                },
            }
        }
        Ok(i)
    }
}

/// What one framing byte did.
enum Byte {
    Taken,
    /// Not consumed: it ends the size and is read again as the line's rest.
    Kept,
    /// It ended the trailer: the body is complete.
    Last,
}

impl Chunk {
    /// The start of a chunk-size line: the body's first chunk, or the one after a CRLF.
    const SIZE_LINE: Chunk = Chunk::Size {
        value: 0,
        digits: 0,
        len: 0,
    };

    /// What follows a chunk-size line: the data, or the trailer after the last chunk.
    fn after_size(size: u64) -> Chunk {
        if size == 0 {
            Chunk::Trailer {
                line_len: 0,
                total: 0,
                cr: false,
            }
        } else {
            Chunk::Data { remaining: size }
        }
    }

    /// One byte of a chunk's framing: its size line, the CRLF after its data, or the
    /// trailer (`Data` is taken by the caller a span at a time).
    #[inline]
    fn framing_byte(&mut self, b: u8) -> Result<Byte, BodyError> {
        match self {
            Chunk::Size { value, digits, len } => {
                if let Some(d) = hex_val(b) {
                    if *digits >= 16 {
                        return Err(BodyError::BadChunkSize);
                    }
                    *value = value
                        .checked_mul(16)
                        .and_then(|v| v.checked_add(d as u64))
                        .ok_or(BodyError::BadChunkSize)?;
                    *digits += 1;
                    *len += 1;
                    return Ok(Byte::Taken);
                }
                if *digits == 0 {
                    return Err(BodyError::BadChunkSize);
                }
                let (value, len) = (*value, *len);
                *self = Chunk::Ext {
                    value,
                    len,
                    cr: false,
                    ext: false,
                };
                Ok(Byte::Kept)
            }
            Chunk::Ext {
                value,
                len,
                cr,
                ext,
            } => {
                *len += 1;
                if *len > CHUNK_HEAD_LIMIT {
                    return Err(BodyError::BadChunkFraming);
                }
                if b == b'\n' {
                    *self = Chunk::after_size(*value);
                } else if *cr {
                    // CR must be followed by LF.
                    return Err(BodyError::BadChunkFraming);
                } else if b == b'\r' {
                    *cr = true;
                } else if b == b';' || b == b' ' || b == b'\t' {
                    *ext = true;
                } else if !(*ext && b.is_ascii_graphic()) {
                    return Err(BodyError::BadChunkSize);
                }
                Ok(Byte::Taken)
            }
            // Taken by `decode` a span at a time, never a byte here.
            Chunk::Data { .. } => Err(BodyError::BadChunkFraming),
            Chunk::DataCr | Chunk::DataLf => {
                let lf = b == b'\n';
                if !(lf || (b == b'\r' && matches!(self, Chunk::DataCr))) {
                    return Err(BodyError::BadChunkFraming);
                }
                *self = if lf { Chunk::SIZE_LINE } else { Chunk::DataLf };
                Ok(Byte::Taken)
            }
            Chunk::Trailer {
                line_len,
                total,
                cr,
            } => trailer_byte(b, line_len, total, cr),
        }
    }
}

/// One byte of the trailer: header lines up to an empty one.
#[inline]
fn trailer_byte(
    b: u8,
    line_len: &mut usize,
    total: &mut usize,
    cr: &mut bool,
) -> Result<Byte, BodyError> {
    *total += 1;
    if *total > TRAILER_LIMIT {
        return Err(BodyError::TrailerTooLarge);
    }
    if b == b'\n' {
        if *line_len == 0 {
            return Ok(Byte::Last);
        }
        *line_len = 0;
        *cr = false;
    } else if *cr {
        return Err(BodyError::BadChunkFraming);
    } else if b == b'\r' {
        *cr = true;
    } else {
        *line_len += 1;
    }
    Ok(Byte::Taken)
}

/// A chunk-size line of hex digits and CRLF only (no extension) at the start of
/// `bytes`, after the CRLF that ends chunk data when `after_data`: its size and length.
/// `None` for anything else, the byte-by-byte path's to read (or reject).
#[inline]
fn size_line(bytes: &[u8], after_data: bool) -> Option<(u64, usize)> {
    let start = if after_data {
        if !bytes.starts_with(b"\r\n") {
            return None;
        }
        2
    } else {
        0
    };
    let mut i = start;
    let mut size = 0u64;
    while i - start < 16 {
        let Some(d) = bytes.get(i).copied().and_then(hex_val) else {
            break;
        };
        size = size << 4 | u64::from(d);
        i += 1;
    }
    (i > start && bytes.get(i..i + 2) == Some(b"\r\n")).then_some((size, i + 2))
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends one chunk of chunked encoding to `out`.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.reserve(data.len() + 20);
    push_hex(out, data.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in lowercase hex without allocating (a chunk size per relayed span goes
/// through here: a byte at a time, no call to copy a few bytes).
#[inline]
pub fn push_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - (n | 1).leading_zeros()).div_ceil(4);
    for d in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (4 * d)) & 15]);
    }
}

/// The last chunk of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_split(
        framing: Framing,
        input: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<u8>, usize, bool), BodyError> {
        let mut d = BodyDecoder::new(framing);
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        cuts.sort_unstable();
        cuts.push(input.len());
        let mut prev = 0;
        for c in cuts {
            // Unconsumed bytes are offered again with the next read, as the relay does.
            let piece = &input[consumed.max(prev).min(c)..c];
            let start = consumed.max(prev).min(c);
            let n = d.decode(piece, |s| out.extend_from_slice(s))?;
            consumed = start + n;
            prev = c;
            if d.is_done() {
                break;
            }
        }
        Ok((out, consumed, d.is_done()))
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        for cut in 0..=input.len() {
            let (out, used, done) = decode_split(Framing::Chunked, input, &[cut]).unwrap();
            assert_eq!(out, b"hello world");
            assert!(done);
            assert_eq!(&input[used..], b"GET /next");
        }
    }

    #[test]
    fn rejects_bad_chunks() {
        let bad: &[&[u8]] = &[
            b"zz\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
            b"ffffffffffffffff0\r\n",
            b"5\r\nhelloXX",
            b"5\rX",
            b"-5\r\n",
        ];
        for b in bad {
            assert!(
                decode_split(Framing::Chunked, b, &[]).is_err(),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        let long_ext = [b"1;".as_slice(), &vec![b'a'; CHUNK_HEAD_LIMIT], b"\r\n"].concat();
        assert_eq!(
            decode_split(Framing::Chunked, &long_ext, &[]),
            Err(BodyError::BadChunkFraming)
        );
    }

    #[test]
    fn content_length_stops_at_end() {
        let (out, used, done) = decode_split(Framing::Length(5), b"helloEXTRA", &[2]).unwrap();
        assert_eq!((out.as_slice(), used, done), (&b"hello"[..], 5, true));
    }

    #[test]
    fn hex() {
        let mut v = Vec::new();
        push_hex(&mut v, 0);
        push_hex(&mut v, 255);
        push_hex(&mut v, 0x1a2b);
        assert_eq!(v, b"0ff1a2b");
        for n in [1, 15, 16, 255, 256, 4095, 4096, 1 << 20, usize::MAX] {
            v.clear();
            push_hex(&mut v, n);
            assert_eq!(v, format!("{n:x}").as_bytes());
        }
    }

    proptest! {
        #[test]
        fn chunked_roundtrip_any_split(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..50), 0..10),
            cuts in proptest::collection::vec(0usize..600, 0..8),
        ) {
            let mut enc = Vec::new();
            for c in &chunks { encode_chunk(&mut enc, c); }
            enc.extend_from_slice(LAST_CHUNK);
            let (out, used, done) = decode_split(Framing::Chunked, &enc, &cuts).unwrap();
            prop_assert_eq!(out, chunks.concat());
            prop_assert!(done);
            prop_assert_eq!(used, enc.len());
        }

        /// A chunk handed out whole is the input's own bytes: its size line (the
        /// data's length in hex), the data, CRLF; and every split decodes the same data.
        #[test]
        fn whole_chunks_are_the_inputs_framing(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..50), 0..10),
            cuts in proptest::collection::vec(0usize..600, 0..8),
            upper in any::<bool>(),
        ) {
            let mut enc = Vec::new();
            for c in &chunks {
                let size = if upper { format!("{:X}", c.len()) } else { format!("{:04x}", c.len()) };
                enc.extend_from_slice(size.as_bytes());
                enc.extend_from_slice(b"\r\n");
                enc.extend_from_slice(c);
                enc.extend_from_slice(b"\r\n");
            }
            enc.extend_from_slice(LAST_CHUNK);
            let mut d = BodyDecoder::new(Framing::Chunked);
            let (mut data, mut consumed, mut wholes) = (Vec::new(), 0, 0);
            let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(enc.len())).collect();
            bounds.sort_unstable();
            bounds.push(enc.len());
            for c in bounds {
                // Unconsumed bytes come again with the next read, as the relay does.
                let input = &enc[consumed.min(c)..c];
                consumed = consumed.min(c) + d.decode_framed(input, |span, whole| {
                    data.extend_from_slice(span);
                    if let Some(w) = whole {
                        wholes += 1;
                        let head = &w[..w.len() - span.len() - 2];
                        let hex = std::str::from_utf8(&head[..head.len() - 2]).unwrap();
                        assert_eq!(usize::from_str_radix(hex, 16).unwrap(), span.len());
                        assert!(head.ends_with(b"\r\n") && w.ends_with(b"\r\n"));
                        assert_eq!(&w[head.len()..w.len() - 2], span);
                    }
                }).unwrap();
            }
            prop_assert_eq!(consumed, enc.len());
            prop_assert!(d.is_done());
            prop_assert_eq!(data, chunks.concat());
            if cuts.is_empty() {
                prop_assert_eq!(wholes, chunks.len());
            }
        }

        /// Whole size lines are read in one step; byte by byte the same input must
        /// decode to the same body, end and error.
        #[test]
        fn size_lines_at_once_read_as_byte_by_byte(
            pieces in proptest::collection::vec(prop_oneof![
                Just(b"\r\n".to_vec()),
                Just(b"\r".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"0".to_vec()),
                Just(b"3".to_vec()),
                Just(b"a".to_vec()),
                Just(b"F".to_vec()),
                Just(b";x".to_vec()),
                Just(b"0000000000000000".to_vec()),
                Just(b"abc".to_vec()),
                Just(b"X-T: 1".to_vec()),
            ], 0..30),
        ) {
            let input = pieces.concat();
            let every_byte: Vec<usize> = (1..input.len()).collect();
            let whole = decode_split(Framing::Chunked, &input, &[]);
            let split = decode_split(Framing::Chunked, &input, &every_byte);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn chunked_never_panics(input in proptest::collection::vec(any::<u8>(), 0..200), cuts in proptest::collection::vec(0usize..200, 0..4)) {
            let _ = decode_split(Framing::Chunked, &input, &cuts);
        }
    }
}
