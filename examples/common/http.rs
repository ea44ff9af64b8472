//! A tiny blocking HTTP/1.1 server for the examples (mock backend, webhook receiver):
//! thread per connection, keep-alive, Content-Length and chunked request bodies.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

/// One request; a connection reads each of its requests into the same one, reusing
/// its buffers (the webhook receiver takes tens of thousands a second in benchmarks,
/// on the load generator's core).
#[derive(Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    head: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The client asked to close the connection after this request.
    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
    }
}

/// Binds `host:port` (port 0 picks one) and prints `<name> listening on ADDR`.
pub fn listen(name: &str, host: &str, port: u16) -> TcpListener {
    let listener = TcpListener::bind((host, port)).unwrap_or_else(|e| {
        eprintln!("{name}: cannot listen on {host}:{port}: {e}");
        std::process::exit(1);
    });
    // std listens with a backlog of 128: a burst of thousands of connections (the
    // slow-stream benchmark opens 10,000 at once) would overflow it and connects would
    // time out. SAFETY: listen(2) again on a listening socket we own only resizes its
    // backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    let addr = listener.local_addr().expect("local addr");
    println!("{name} listening on {addr}");
    let _ = std::io::stdout().flush();
    listener
}

/// Accepts connections and runs `conn(reader, writer)` for each on its own thread.
fn per_connection<F>(listener: TcpListener, conn: F)
where
    F: Fn(BufReader<TcpStream>, TcpStream) + Send + Sync + 'static,
{
    let conn = std::sync::Arc::new(conn);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let conn = conn.clone();
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            if let Ok(writer) = stream.try_clone() {
                conn(BufReader::with_capacity(64 * 1024, stream), writer);
            }
        });
    }
}

/// Serves each connection on its own thread with `handler`, which writes the response.
pub fn serve<H>(listener: TcpListener, handler: H)
where
    H: Fn(&Request, &mut TcpStream) -> std::io::Result<bool> + Send + Sync + 'static,
{
    per_connection(listener, move |mut reader, mut writer| {
        let mut req = Request::default();
        while read_request(&mut reader, &mut req) {
            if !matches!(handler(&req, &mut writer), Ok(true)) || req.closes() {
                return;
            }
        }
    });
}

/// Like `serve`, for handlers that answer at once: answers are gathered in a buffer
/// and written when no further request is already read, so a pipelining client gets
/// a burst of answers in one write (as nginx and hyper do) rather than one per POST.
pub fn serve_batched<H>(listener: TcpListener, handler: H)
where
    H: Fn(&Request, &mut Vec<u8>) -> std::io::Result<bool> + Send + Sync + 'static,
{
    per_connection(listener, move |mut reader, mut writer| {
        let mut out = Vec::with_capacity(16 * 1024);
        let mut req = Request::default();
        while read_request(&mut reader, &mut req) {
            let keep = matches!(handler(&req, &mut out), Ok(true)) && !req.closes();
            if (!keep || reader.buffer().is_empty()) && !out.is_empty() {
                if writer.write_all(&out).is_err() {
                    return;
                }
                out.clear();
            }
            if !keep {
                return;
            }
        }
    });
}

/// Where a head in `bytes` ends (after its blank line: CRLF CRLF, or bare LFs).
fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|i| {
        let rest = &bytes[i + 1..];
        if rest.starts_with(b"\n") {
            Some(i + 2)
        } else if rest.starts_with(b"\r\n") {
            Some(i + 3)
        } else {
            None
        }
    })
}

fn read_request(r: &mut BufReader<TcpStream>, out: &mut Request) -> bool {
    read_into(r, out).is_some()
}

fn read_into(r: &mut BufReader<TcpStream>, out: &mut Request) -> Option<()> {
    let mut head = std::mem::take(&mut out.head);
    head.clear();
    // The head in whole buffers, not line by line: a pipelining client sends many
    // requests per read.
    loop {
        let buf = r.fill_buf().ok()?;
        if buf.is_empty() {
            return None;
        }
        // The blank line may start in what was taken already: a small window over
        // the seam, then the new bytes (only the head is copied, not the buffer).
        let (kept, took) = (head.len().min(2), buf.len().min(2));
        let mut seam = [0u8; 4];
        seam[..kept].copy_from_slice(&head[head.len() - kept..]);
        seam[kept..kept + took].copy_from_slice(&buf[..took]);
        let end = head_end(&seam[..kept + took])
            .filter(|&e| e > kept)
            .map(|e| e - kept)
            .or_else(|| head_end(buf));
        match end {
            Some(n) => {
                head.extend_from_slice(&buf[..n]);
                r.consume(n);
                break;
            }
            None => {
                let n = buf.len();
                head.extend_from_slice(buf);
                r.consume(n);
            }
        }
        if head.len() > 1 << 20 {
            return None;
        }
    }
    {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(&head).ok()?;
        set(&mut out.method, req.method?);
        set(&mut out.path, req.path?);
        let n = req.headers.len();
        for (i, h) in req.headers.iter().enumerate() {
            let value = match std::str::from_utf8(h.value) {
                Ok(v) => std::borrow::Cow::Borrowed(v),
                Err(_) => String::from_utf8_lossy(h.value),
            };
            match out.headers.get_mut(i) {
                Some((k, v)) => {
                    set(k, h.name);
                    set(v, &value);
                }
                None => out.headers.push((h.name.to_string(), value.into_owned())),
            }
        }
        out.headers.truncate(n);
    }
    out.head = head;
    out.body.clear();
    if let Some(len) = out
        .header("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        out.body.resize(len, 0);
        r.read_exact(&mut out.body).ok()?;
    } else if out
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                let mut end = String::new();
                r.read_line(&mut end).ok()?;
                break;
            }
            let start = out.body.len();
            out.body.resize(start + size, 0);
            r.read_exact(&mut out.body[start..]).ok()?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).ok()?;
        }
    }
    Some(())
}

/// `s = v`, keeping `s`'s allocation.
fn set(s: &mut String, v: &str) {
    s.clear();
    s.push_str(v);
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a whole response with a Content-Length body.
pub fn respond(w: &mut TcpStream, status: u16, ctype: &str, body: &[u8]) -> std::io::Result<bool> {
    let mut all = Vec::with_capacity(body.len() + 128);
    respond_into(&mut all, status, ctype, body);
    w.write_all(&all)?;
    Ok(true)
}

/// Appends a whole response with a Content-Length body to `out`.
/// Decimal digits of `n`, without the formatting machinery (one answer per record).
fn push_num(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

pub fn respond_into(out: &mut Vec<u8>, status: u16, ctype: &str, body: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_num(out, status as usize);
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: ");
    out.extend_from_slice(ctype.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    push_num(out, body.len());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Value of a `--name value` command-line flag.
pub fn flag(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}
