//! `multipart/form-data` (RFC 7578) as an incremental scanner: bytes in, the small
//! form fields the proxy needs out (`model`, `stream`, the flattened stream options of
//! vLLM's transcription API), in constant memory whatever the size of the file parts
//! (their contents are skipped, never held). State is carried across reads, so a
//! delimiter or a part's headers may be split anywhere (property-tested at every split).

/// The fields read; any other part (the audio file) is skipped.
const WANTED: [&[u8]; 5] = [
    b"model",
    b"stream",
    b"stream_include_usage",
    b"stream_continuous_usage_stats",
    b"user",
];
/// A wanted field's value longer than this is refused (model ids are short).
const MAX_VALUE: usize = 1024;
/// A part's header block longer than this is refused.
const MAX_PART_HEAD: usize = 8 * 1024;
/// RFC 2046: a boundary is 1 to 70 characters.
const MAX_BOUNDARY: usize = 70;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fields {
    pub model: Option<String>,
    pub stream: Option<String>,
    pub stream_include_usage: Option<String>,
    pub stream_continuous_usage_stats: Option<String>,
    pub user: Option<String>,
}

impl Fields {
    fn slot(&mut self, i: usize) -> &mut Option<String> {
        match i {
            0 => &mut self.model,
            1 => &mut self.stream,
            2 => &mut self.stream_include_usage,
            3 => &mut self.stream_continuous_usage_stats,
            _ => &mut self.user,
        }
    }

    /// A form value read as a boolean the way vLLM's (pydantic's) form parsing does
    /// for the usual spellings.
    pub fn flag(v: &Option<String>) -> bool {
        v.as_deref().is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "true" | "1" | "yes" | "on"
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultipartError {
    /// No `boundary` parameter, or an invalid one.
    Boundary,
    /// A part's headers are too long or malformed.
    PartHead,
    /// A wanted field's value is too long or not UTF-8.
    Value,
    /// The body ended before the closing delimiter.
    Truncated,
}

impl MultipartError {
    pub fn message(self) -> &'static str {
        match self {
            MultipartError::Boundary => "Content-Type must be multipart/form-data with a boundary.",
            MultipartError::PartHead => "Malformed multipart part headers.",
            MultipartError::Value => "A form field value is too long or not UTF-8.",
            MultipartError::Truncated => "The multipart body ended before its closing boundary.",
        }
    }
}

/// The boundary of a `multipart/form-data` Content-Type value.
pub fn boundary(content_type: &[u8]) -> Result<Vec<u8>, MultipartError> {
    let mut params = content_type.split(|&b| b == b';');
    let kind = params.next().unwrap_or(b"").trim_ascii();
    if !kind.eq_ignore_ascii_case(b"multipart/form-data") {
        return Err(MultipartError::Boundary);
    }
    for p in params {
        let p = p.trim_ascii();
        let Some(eq) = p.iter().position(|&b| b == b'=') else {
            continue;
        };
        if !p[..eq].trim_ascii().eq_ignore_ascii_case(b"boundary") {
            continue;
        }
        let mut v = p[eq + 1..].trim_ascii();
        if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' {
            v = &v[1..v.len() - 1];
        }
        if v.is_empty() || v.len() > MAX_BOUNDARY || v.iter().any(|b| !(0x20..=0x7e).contains(b)) {
            return Err(MultipartError::Boundary);
        }
        return Ok(v.to_vec());
    }
    Err(MultipartError::Boundary)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter (a preamble is skipped).
    Preamble,
    /// After a delimiter: `--` closes the body, else transport padding and CRLF.
    AfterDelimiter,
    /// Reading a part's header block.
    PartHead,
    /// Inside a part's content; `Some(i)` captures a wanted field.
    Content(Option<usize>),
    Done,
}

#[derive(Debug)]
pub struct MultipartScanner {
    /// `\r\n--` + boundary: what ends a part's content.
    delimiter: Vec<u8>,
    state: State,
    /// Bytes at the end of the last read that may begin a delimiter.
    held: Vec<u8>,
    /// The current part's headers, or the current wanted value.
    buf: Vec<u8>,
    /// After a delimiter: the bytes seen so far of `--` or the padding and CRLF.
    after: Vec<u8>,
    pub fields: Fields,
    error: Option<MultipartError>,
}

impl MultipartScanner {
    pub fn new(boundary: &[u8]) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary);
        MultipartScanner {
            delimiter,
            state: State::Preamble,
            // The body's first delimiter has no CRLF before it: one is supposed.
            held: b"\r\n".to_vec(),
            buf: Vec::new(),
            after: Vec::new(),
            fields: Fields::default(),
            error: None,
        }
    }

    /// The closing delimiter was read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Inside a part the scanner skips (the file), or at the end: every field before
    /// it has been read (`model` is known now if it comes before the file, as clients
    /// send it), so the rest of the body may stream on unread.
    pub fn past_fields(&self) -> bool {
        matches!(self.state, State::Content(None) | State::Done)
    }

    pub fn error(&self) -> Option<MultipartError> {
        self.error
    }

    /// The fields read so far, for a body whose rest streams on unread.
    pub fn fields_so_far(&self) -> Result<Fields, MultipartError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.fields.clone()),
        }
    }

    /// The fields once the body ended (`finish` checks it was complete).
    pub fn finish(self) -> Result<Fields, MultipartError> {
        match (self.error, self.state) {
            (Some(e), _) => Err(e),
            (None, State::Done) => Ok(self.fields),
            _ => Err(MultipartError::Truncated),
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.error.is_some() || self.state == State::Done {
            return;
        }
        let mut input = chunk;
        while !input.is_empty() && self.error.is_none() && self.state != State::Done {
            input = match self.state {
                State::Preamble | State::Content(_) => self.content(input),
                State::AfterDelimiter => self.after_delimiter(input),
                State::PartHead => self.part_head(input),
                State::Done => &[],
            };
        }
    }

    /// Content (or preamble) until the delimiter; returns what follows it.
    fn content<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        let d = std::mem::take(&mut self.delimiter);
        let rest = self.content_until(&d, input);
        self.delimiter = d;
        rest
    }

    fn content_until<'a>(&mut self, d: &[u8], input: &'a [u8]) -> &'a [u8] {
        // The held bytes are a proper prefix of the delimiter: complete it from the
        // input, or give them up as content.
        while !self.held.is_empty() {
            let need = d.len() - self.held.len();
            let take = need.min(input.len());
            if d[self.held.len()..self.held.len() + take] == input[..take] {
                if take == need {
                    self.held.clear();
                    self.end_content();
                    return &input[take..];
                }
                self.held.extend_from_slice(&input[..take]);
                return &[];
            }
            // Not a delimiter: the first held byte is content; try the rest again.
            let first = self.held.remove(0);
            self.content_bytes(&[first]);
            let rest = std::mem::take(&mut self.held);
            let keep = longest_prefix_suffix(&rest, d);
            self.content_bytes(&rest[..rest.len() - keep]);
            self.held.extend_from_slice(&rest[rest.len() - keep..]);
        }
        if let Some(at) = memchr::memmem::find(input, d) {
            self.content_bytes(&input[..at]);
            self.end_content();
            return &input[at + d.len()..];
        }
        let keep = longest_prefix_suffix(input, d);
        self.content_bytes(&input[..input.len() - keep]);
        self.held.extend_from_slice(&input[input.len() - keep..]);
        &[]
    }

    fn content_bytes(&mut self, bytes: &[u8]) {
        if let State::Content(Some(_)) = self.state {
            if self.buf.len() + bytes.len() > MAX_VALUE {
                self.error = Some(MultipartError::Value);
            } else {
                self.buf.extend_from_slice(bytes);
            }
        }
    }

    fn end_content(&mut self) {
        if let State::Content(Some(i)) = self.state {
            match String::from_utf8(std::mem::take(&mut self.buf)) {
                Ok(v) => *self.fields.slot(i) = Some(v),
                Err(_) => self.error = Some(MultipartError::Value),
            }
        }
        self.buf.clear();
        self.after.clear();
        self.state = State::AfterDelimiter;
    }

    /// `--` (the close), or optional whitespace then CRLF (another part).
    fn after_delimiter<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        for (i, &b) in input.iter().enumerate() {
            self.after.push(b);
            let a = &self.after[..];
            if a == b"--" {
                self.state = State::Done;
                return &[];
            }
            if a.ends_with(b"\r\n") && a[..a.len() - 2].iter().all(|&c| c == b' ' || c == b'\t') {
                self.state = State::PartHead;
                self.buf.clear();
                return &input[i + 1..];
            }
            let padding_ok = a == b"-"
                || a.iter().all(|&c| c == b' ' || c == b'\t')
                || (a.ends_with(b"\r")
                    && a[..a.len() - 1].iter().all(|&c| c == b' ' || c == b'\t'));
            if !padding_ok || a.len() > 64 {
                self.error = Some(MultipartError::PartHead);
                return &[];
            }
        }
        &[]
    }

    /// A part's header block, up to its blank line.
    fn part_head<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        let before = self.buf.len();
        let take = input.len().min(MAX_PART_HEAD + 4 - before);
        self.buf.extend_from_slice(&input[..take]);
        // Search from a little before the new bytes: the blank line may straddle.
        let from = before.saturating_sub(3);
        match memchr::memmem::find(&self.buf[from..], b"\r\n\r\n") {
            Some(at) => {
                let end = from + at;
                let used = end + 4 - before;
                let wanted = part_name(&self.buf[..end])
                    .and_then(|n| WANTED.iter().position(|w| *w == n.as_slice()));
                match part_name_checked(&self.buf[..end]) {
                    Ok(()) => {}
                    Err(e) => {
                        self.error = Some(e);
                        return &[];
                    }
                }
                self.buf.clear();
                self.state = State::Content(wanted);
                &input[used..]
            }
            None if self.buf.len() > MAX_PART_HEAD => {
                self.error = Some(MultipartError::PartHead);
                &[]
            }
            None => &[],
        }
    }
}

/// A part's header block must have a `Content-Disposition: form-data` header.
fn part_name_checked(head: &[u8]) -> Result<(), MultipartError> {
    let has = head.split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.iter().position(|&b| b == b':').is_some_and(|c| {
            line[..c]
                .trim_ascii()
                .eq_ignore_ascii_case(b"content-disposition")
        })
    });
    if has {
        Ok(())
    } else {
        Err(MultipartError::PartHead)
    }
}

/// The `name` parameter of a part's Content-Disposition header.
fn part_name(head: &[u8]) -> Option<Vec<u8>> {
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(c) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..c]
            .trim_ascii()
            .eq_ignore_ascii_case(b"content-disposition")
        {
            continue;
        }
        for p in line[c + 1..].split(|&b| b == b';').skip(1) {
            let p = p.trim_ascii();
            let Some(eq) = p.iter().position(|&b| b == b'=') else {
                continue;
            };
            if !p[..eq].trim_ascii().eq_ignore_ascii_case(b"name") {
                continue;
            }
            let v = p[eq + 1..].trim_ascii();
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            return Some(v.to_vec());
        }
    }
    None
}

/// The length of the longest suffix of `data` that is a proper prefix of `pattern`.
fn longest_prefix_suffix(data: &[u8], pattern: &[u8]) -> usize {
    let max = (pattern.len() - 1).min(data.len());
    (1..=max)
        .rev()
        .find(|&n| data[data.len() - n..] == pattern[..n])
        .unwrap_or(0)
}

/// A form part naming `name` with `value`, ready to put before a body's first part
/// (`--boundary` CRLF headers CRLF CRLF value CRLF).
pub fn field_part(boundary: &[u8], name: &str, value: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(boundary.len() + name.len() + value.len() + 64);
    p.extend_from_slice(b"--");
    p.extend_from_slice(boundary);
    p.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"");
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(b"\"\r\n\r\n");
    p.extend_from_slice(value.as_bytes());
    p.extend_from_slice(b"\r\n");
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: &str = "----llmproxyBoundary7MA4YWxk";

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, filename, value) in parts {
            b.extend_from_slice(format!("--{B}\r\n").as_bytes());
            match filename {
                Some(f) => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
                ),
                None => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            b.extend_from_slice(value);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        b
    }

    fn scan(pieces: &[&[u8]]) -> Result<Fields, MultipartError> {
        let mut s = MultipartScanner::new(B.as_bytes());
        for p in pieces {
            s.feed(p);
        }
        s.finish()
    }

    /// Audio bytes that look like delimiters and CRLFs without being one.
    fn tricky_audio() -> Vec<u8> {
        let mut a = b"RIFF\r\n--".to_vec();
        a.extend_from_slice(&B.as_bytes()[..10]);
        a.extend_from_slice(b"\r\n\r\n-\r\n--");
        a.extend_from_slice(&B.as_bytes()[..B.len() - 1]);
        a.extend_from_slice(b"x\r");
        a.extend((0..=255u8).cycle().take(3000));
        a
    }

    #[test]
    fn reads_the_fields_around_a_file_at_every_split() {
        let audio = tricky_audio();
        let b = body(&[
            ("file", Some("a.wav"), &audio),
            ("model", None, b"whisper-large-v3"),
            ("stream", None, b"true"),
            ("language", None, b"en"),
        ]);
        for cut in 0..=b.len() {
            let f = scan(&[&b[..cut], &b[cut..]]).unwrap_or_else(|e| panic!("cut {cut}: {e:?}"));
            assert_eq!(f.model.as_deref(), Some("whisper-large-v3"), "cut {cut}");
            assert_eq!(f.stream.as_deref(), Some("true"));
            assert!(Fields::flag(&f.stream));
            assert_eq!(f.stream_include_usage, None);
        }
    }

    #[test]
    fn byte_by_byte_and_with_a_preamble_and_padding() {
        let mut b = b"preamble text\r\n".to_vec();
        b.extend_from_slice(&body(&[("model", None, b"m"), ("file", Some("f"), b"x")]));
        // Transport padding after a delimiter.
        let b = String::from_utf8(b)
            .unwrap()
            .replacen(
                &format!("--{B}\r\nContent-Disposition: form-data; name=\"file\""),
                &format!("--{B}  \r\nContent-Disposition: form-data; name=\"file\""),
                1,
            )
            .into_bytes();
        let pieces: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(scan(&pieces).unwrap().model.as_deref(), Some("m"));
    }

    #[test]
    fn errors() {
        let b = body(&[("model", None, b"m")]);
        assert_eq!(scan(&[&b[..b.len() - 5]]), Err(MultipartError::Truncated));
        let long = vec![b'a'; MAX_VALUE + 1];
        assert_eq!(
            scan(&[&body(&[("model", None, &long)])]),
            Err(MultipartError::Value)
        );
        let bad = format!("--{B}\r\nX: y\r\n\r\nv\r\n--{B}--").into_bytes();
        assert_eq!(scan(&[&bad]), Err(MultipartError::PartHead));
        let junk = format!("--{B}zz\r\n").into_bytes();
        assert_eq!(scan(&[&junk]), Err(MultipartError::PartHead));
        // A big file value is skipped, not held.
        let big = vec![b'z'; 5 << 20];
        let mut s = MultipartScanner::new(B.as_bytes());
        s.feed(&body(&[("file", Some("a"), &big), ("model", None, b"m")]));
        assert!(s.buf.capacity() < 64 * 1024 && s.held.capacity() < 1024);
        assert_eq!(s.finish().unwrap().model.as_deref(), Some("m"));
    }

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary(b"multipart/form-data; boundary=abc").unwrap(),
            b"abc"
        );
        assert_eq!(
            boundary(b"Multipart/Form-Data;charset=utf-8; boundary=\"a b\"").unwrap(),
            b"a b"
        );
        assert!(boundary(b"application/json").is_err());
        assert!(boundary(b"multipart/form-data").is_err());
        assert!(boundary(b"multipart/form-data; boundary=").is_err());
        let long = format!("multipart/form-data; boundary={}", "a".repeat(71));
        assert!(boundary(long.as_bytes()).is_err());
    }

    #[test]
    fn the_fields_before_the_file_are_known_once_it_starts() {
        let b = body(&[
            ("model", None, b"m"),
            ("stream", None, b"true"),
            ("file", Some("a.wav"), &[1u8; 5000]),
        ]);
        let file_at = memchr::memmem::find(&b, b"filename").unwrap() + 60;
        let mut s = MultipartScanner::new(B.as_bytes());
        s.feed(&b[..file_at]);
        assert!(s.past_fields());
        let f = s.fields_so_far().unwrap();
        assert_eq!(
            (f.model.as_deref(), f.stream.as_deref()),
            (Some("m"), Some("true"))
        );
        // Not before: the model's own part is a wanted field.
        let mut s = MultipartScanner::new(B.as_bytes());
        s.feed(&b[..60]);
        assert!(!s.past_fields());
    }

    #[test]
    fn a_field_part_put_first_is_read() {
        let mut b = field_part(B.as_bytes(), "stream_include_usage", "true");
        b.extend_from_slice(&body(&[("model", None, b"m")]));
        let f = scan(&[&b]).unwrap();
        assert!(Fields::flag(&f.stream_include_usage));
        assert_eq!(f.model.as_deref(), Some("m"));
    }

    proptest! {
        #[test]
        fn any_splits_give_the_same_fields(
            file in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'-'), any::<u8>(), Just(B.as_bytes()[3])], 0..400),
            model in "[a-zA-Z0-9/._-]{1,40}",
            cuts in proptest::collection::vec(0usize..600, 0..6),
            model_first in any::<bool>(),
        ) {
            let parts: Vec<(&str, Option<&str>, &[u8])> = if model_first {
                vec![("model", None, model.as_bytes()), ("file", Some("a.wav"), &file)]
            } else {
                vec![("file", Some("a.wav"), &file), ("model", None, model.as_bytes())]
            };
            let b = body(&parts);
            let mut s = MultipartScanner::new(B.as_bytes());
            for piece in crate::testing::pieces(&b, &cuts) {
                s.feed(piece);
            }
            let f = s.finish().unwrap();
            prop_assert_eq!(f.model.as_deref(), Some(model.as_str()));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..300) {
            let mut s = MultipartScanner::new(b"xyz");
            let cut = cut.min(bytes.len());
            s.feed(&bytes[..cut]);
            s.feed(&bytes[cut..]);
            let _ = s.finish();
        }
    }
}
