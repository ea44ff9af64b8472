//! A lean HTTP/1.1 client for an `http://` webhook: one keep-alive connection, and
//! POSTs pipelined in batches (each still carries one record and its own
//! Idempotency-Key). Sending one record per POST and waiting for each answer costs a
//! round trip, two syscalls and a context switch per record; pipelining a backlog
//! sends it in one write. Built on the crate's own response parsing (httparse and
//! the body decoder). `https://` webhooks go through ureq instead.
//!
//! The socket is non-blocking, and while the client waits for answers it writes
//! whatever of the batch the socket takes (`Conn::fill`): a deep pipeline sends more
//! than the sockets buffer, and a receiver that answers each POST before reading the
//! next would otherwise wait on a client that waits on it.

use crate::http::body::{BodyDecoder, Framing};
use crate::http::head::ResponseHead;
use crate::http::write::Head;
use crate::url::Url;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A webhook response larger than this is not read further (only an excerpt is kept).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The request buffer is kept from one batch to the next while no larger than this.
const KEEP_REQUEST: usize = 4 << 20;
/// The answers' read buffer (it grows when an answer does not fit): the answers to
/// a low-rate take (~200 POSTs at 2,000 req/s, ~80 bytes each) in one `recv`, where
/// 16 KiB took two.
const READ_BUF: usize = 64 * 1024;
/// While the client waits (for answers, or between retries), its `Watch` is called
/// this often.
const WATCH_TICK: Duration = super::writer::SYNC_INTERVAL;

/// Called while the client waits with `after`: the sender's take, held unsettled this
/// long, is to be made durable (`Rings::sync_if_late`). `Duration::ZERO` before a wait
/// no tick interrupts (connecting). With a watch, the spool writer need not wake to
/// look at the take itself (`Rings::sender_watches`).
pub type Watch = Arc<dyn Fn(Duration) + Send + Sync>;

pub struct PlainHttp {
    host: String,
    port: u16,
    /// Every POST's head up to its own headers, rendered once: request line, host,
    /// user-agent, content-type and `usage_hook.headers` (building them per record
    /// was a quarter of the sender's instructions).
    prefix: Vec<u8>,
    /// Signs each POST (`usage_hook.signing_secret`).
    signer: Option<super::signing::Signer>,
    timeout: Duration,
    conn: Option<Conn>,
    req: Vec<u8>,
    /// Answers owed by the batch `start` began, and why it could not be sent (then
    /// `finish` answers each with that).
    owed: usize,
    failed: Option<String>,
    watch: Option<Watch>,
}

struct Conn {
    /// Non-blocking; `wait` polls it for at most `timeout`.
    stream: TcpStream,
    timeout: Duration,
    watch: Option<Watch>,
    /// The batch being sent (taken from `PlainHttp::req` for the exchange) and how much
    /// of it the socket has taken.
    pending: Vec<u8>,
    sent: usize,
    /// Read buffer, always at its full length (zeroed once): `start..end` is unread.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Parsed heads land here (its buffers reused from one answer to the next).
    head: ResponseHead,
    /// The last 2xx head with a Content-Length, byte for byte, and what it said
    /// (status, body length, keep-alive): a receiver answers every record alike, so
    /// an identical head is known without parsing it again.
    same: Vec<u8>,
    same_says: (u16, u64, bool),
}

/// One POST's answer: status and a short excerpt of the body (empty for a 2xx, whose
/// body nobody reads).
pub type Answer = Result<(u16, String), String>;

/// One answer read off the connection: (status, excerpt), and whether the connection
/// stays usable.
type Read1 = ((u16, String), bool);

impl PlainHttp {
    /// `None` for anything but a plain `http://` URL.
    pub fn new(
        url: &Url,
        headers: &[(String, String)],
        signer: Option<super::signing::Signer>,
        timeout: Duration,
    ) -> Option<PlainHttp> {
        if url.scheme != "http" {
            return None;
        }
        let mut prefix = Vec::new();
        let mut w = Head::request(
            &mut prefix,
            b"POST",
            url.path.as_bytes(),
            url.authority.as_bytes(),
        );
        w.header(b"user-agent", b"llmproxy")
            .header(b"content-type", b"application/json");
        for (k, v) in headers {
            w.header(k.as_bytes(), v.as_bytes());
        }
        Some(PlainHttp {
            host: url.host.clone(),
            port: url.port,
            prefix,
            signer,
            timeout,
            conn: None,
            req: Vec::new(),
            owed: 0,
            failed: None,
            watch: None,
        })
    }

    /// Calls `watch` while waiting (see `Watch`).
    pub fn watch(&mut self, watch: Watch) {
        self.watch = Some(watch);
    }

    /// Sleeps `d` (a retry's backoff), calling the watch each `WATCH_TICK`.
    pub fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(WATCH_TICK));
            if let Some(w) = &self.watch {
                w(2 * WATCH_TICK);
            }
        }
    }

    fn connect(&mut self) -> Result<&mut Conn, String> {
        if self.conn.is_none() {
            // Resolving and connecting block for up to `timeout` with no tick.
            if let Some(w) = &self.watch {
                w(Duration::ZERO);
            }
            let addrs = (self.host.as_str(), self.port)
                .to_socket_addrs()
                .map_err(|e| format!("resolve {}: {e}", self.host))?;
            let mut last = format!("{} resolves to no address", self.host);
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, self.timeout) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        if let Err(e) = s.set_nonblocking(true) {
                            last = format!("connect {addr}: {e}");
                            continue;
                        }
                        self.conn = Some(Conn {
                            stream: s,
                            timeout: self.timeout,
                            watch: self.watch.clone(),
                            pending: Vec::new(),
                            sent: 0,
                            buf: vec![0; READ_BUF],
                            start: 0,
                            end: 0,
                            head: ResponseHead::default(),
                            same: Vec::new(),
                            same_says: (0, 0, false),
                        });
                        break;
                    }
                    Err(e) => last = format!("connect {addr}: {e}"),
                }
            }
            if self.conn.is_none() {
                return Err(last);
            }
        }
        self.conn
            .as_mut()
            .ok_or_else(|| "no connection".to_string())
    }

    /// POSTs every `(body, idempotency key)` on one connection, pipelined; answers come
    /// back in order. If the connection breaks, the rest are `Err` (retry them: a
    /// receiver deduplicates on the key).
    pub fn post_many(&mut self, items: &[(&[u8], &str)]) -> Vec<Answer> {
        self.start(items);
        self.finish()
    }

    /// The first half of `post_many`: the POSTs are written as far as the socket takes
    /// them now, without waiting; true if all were. `finish` writes the rest and reads
    /// the answers, at once or later (the sender reads a low-rate take's answers at its
    /// next turn: one wake-up a take instead of two). Nothing else may be sent between.
    pub fn start(&mut self, items: &[(&[u8], &str)]) -> bool {
        // The batch's bytes, in a buffer kept from one batch to the next (a fresh
        // ~90 KiB one per batch came back from the kernel zeroed each time).
        let mut req = std::mem::take(&mut self.req);
        req.clear();
        req.reserve(items.iter().map(|(b, _)| b.len() + 256).sum());
        for (body, key) in items {
            req.extend_from_slice(&self.prefix);
            let mut w = Head::resume(&mut req);
            w.header(b"idempotency-key", key.as_bytes());
            if let Some(signer) = &self.signer {
                signer.write_headers(&mut w, key, body);
            }
            w.content_length(body.len() as u64);
            w.end();
            req.extend_from_slice(body);
        }
        self.owed = items.len();
        self.failed = None;
        let sent = match self.connect() {
            Ok(conn) => {
                conn.pending = req;
                conn.sent = 0;
                conn.send_some().map(|()| conn.sent == conn.pending.len())
            }
            Err(e) => {
                self.req = req;
                Err(e)
            }
        };
        sent.unwrap_or_else(|e| {
            self.failed = Some(e);
            false
        })
    }

    /// The second half of `post_many`: the answers to what `start` began, in order.
    pub fn finish(&mut self) -> Vec<Answer> {
        let n = std::mem::take(&mut self.owed);
        let mut answers = Vec::with_capacity(n);
        let result = match (self.failed.take(), self.conn.as_mut()) {
            (Some(e), _) => Err(e),
            (None, Some(conn)) => {
                let r = conn.exchange(n, &mut answers);
                let req = std::mem::take(&mut conn.pending);
                // Kept unless a catch-up round made it large (up to the sender's
                // `MAX_ROUND` records).
                if req.capacity() <= KEEP_REQUEST {
                    self.req = req;
                }
                r
            }
            (None, None) => Err("no connection".to_string()),
        };
        if let Err(e) = result {
            self.conn = None;
            while answers.len() < n {
                answers.push(Err(e.clone()));
            }
        }
        answers
    }
}

impl Conn {
    /// Sends `pending` and reads `n` answers into `answers` (in order); `Err` ends the
    /// connection's use (the answers not read are the caller's to retry).
    fn exchange(&mut self, n: usize, answers: &mut Vec<Answer>) -> Result<(), String> {
        self.send_some()?;
        for _ in 0..n {
            let (answer, keep) = self.read_answer()?;
            answers.push(Ok(answer));
            if !keep {
                return Err("the webhook closed the connection".to_string());
            }
        }
        if self.sent < self.pending.len() {
            // Every answer came before its request was whole: nothing to trust after.
            return Err("the webhook answered before the requests were sent".to_string());
        }
        Ok(())
    }

    /// Writes as much of `pending` as the socket takes now.
    fn send_some(&mut self) -> Result<(), String> {
        while self.sent < self.pending.len() {
            match self.stream.write(&self.pending[self.sent..]) {
                Ok(0) => return Err("the webhook closed the connection".into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Reads more of the answers, writing the rest of `pending` meanwhile; waits at
    /// most `timeout` for either to move.
    fn fill(&mut self) -> Result<(), String> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err("the webhook closed the connection".into()),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
            self.wait()?;
            self.send_some()?;
        }
    }

    /// Until the socket can be read, or written while requests are left to send; at
    /// most `timeout`, calling the watch each `WATCH_TICK` meanwhile.
    fn wait(&self) -> Result<(), String> {
        let writing = self.sent < self.pending.len();
        let mut fd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN | if writing { libc::POLLOUT } else { 0 },
            revents: 0,
        };
        let end = Instant::now() + self.timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let tick = match &self.watch {
                Some(_) => left.min(WATCH_TICK),
                None => left,
            };
            // Rounded up: a wait of under 1 ms is not a busy loop of zero-timeout polls.
            let ms = i32::try_from(tick.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd, for the socket this Conn owns.
            match unsafe { libc::poll(&mut fd, 1, ms) } {
                0 if tick < left => {
                    if let Some(w) = &self.watch {
                        w(2 * WATCH_TICK);
                    }
                }
                0 => return Err("timed out waiting for the webhook".into()),
                n if n > 0 => return Ok(()),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != ErrorKind::Interrupted {
                        return Err(e.to_string());
                    }
                }
            }
        }
    }

    /// One response: (status, body excerpt), and whether the connection stays usable.
    fn read_answer(&mut self) -> Result<Read1, String> {
        if let Some(answer) = self.same_answer()? {
            return Ok(answer);
        }
        let head_len = loop {
            match self
                .head
                .parse(&self.buf[self.start..self.end], MAX_RESPONSE_HEAD)
            {
                Ok(Some(n)) => {
                    self.start += n;
                    if (100..200).contains(&self.head.status) {
                        continue;
                    }
                    break n;
                }
                Ok(None) => self.fill()?,
                Err(e) => return Err(format!("invalid response from the webhook: {e:?}")),
            }
        };
        let head = &mut self.head;
        let framing = head
            .framing("POST")
            .map_err(|e| format!("invalid response framing: {e:?}"))?;
        let (status, keep_alive) = (head.status, head.keep_alive);
        match framing {
            Framing::Length(n) if (200..300).contains(&status) => {
                let at = self.start - head_len;
                self.same.clear();
                self.same.extend_from_slice(&self.buf[at..self.start]);
                self.same_says = (status, n, keep_alive);
            }
            _ => self.same.clear(),
        }
        let mut decoder = BodyDecoder::new(framing);
        let mut excerpt = Vec::new();
        let keep_excerpt = !(200..300).contains(&status);
        loop {
            let n = decoder
                .decode(&self.buf[self.start..self.end], |s| {
                    let room = if keep_excerpt {
                        200usize.saturating_sub(excerpt.len())
                    } else {
                        0
                    };
                    excerpt.extend_from_slice(&s[..s.len().min(room)]);
                })
                .map_err(|e| e.to_string())?;
            self.start += n;
            if decoder.is_done() {
                break;
            }
            if let Err(e) = self.fill() {
                if decoder.eof_is_clean() {
                    return Ok((
                        (status, String::from_utf8_lossy(&excerpt).into_owned()),
                        false,
                    ));
                }
                return Err(e);
            }
        }
        let excerpt = if excerpt.is_empty() {
            String::new()
        } else {
            String::from_utf8_lossy(&excerpt).into_owned()
        };
        Ok(((status, excerpt), keep_alive))
    }

    /// The answer, when its head is byte for byte the last one remembered: its body
    /// (of the remembered length) is skipped. `None`: parse it.
    fn same_answer(&mut self) -> Result<Option<Read1>, String> {
        let (status, len, keep) = self.same_says;
        let want = self.same.len();
        if want == 0 {
            return Ok(None);
        }
        // Wait for as many bytes as the remembered head has (or a difference).
        while self.end - self.start < want && self.same.starts_with(&self.buf[self.start..self.end])
        {
            self.fill()?;
        }
        if !self.buf[self.start..self.end].starts_with(&self.same) {
            return Ok(None);
        }
        self.start += want;
        let mut left = len;
        loop {
            let take = left.min((self.end - self.start) as u64);
            self.start += take as usize;
            left -= take;
            if left == 0 {
                return Ok(Some(((status, String::new()), keep)));
            }
            self.fill()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A one-connection server on a free port: `f` gets the connection's reader and
    /// writer, on its own thread.
    fn serve_one<T: Send + 'static>(
        f: impl FnOnce(&mut BufReader<TcpStream>, &mut TcpStream) -> T + Send + 'static,
    ) -> (u16, std::thread::JoinHandle<T>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            f(&mut r, &mut s)
        });
        (port, server)
    }

    /// Reads one POST (head and body) off `r`; returns its Idempotency-Key.
    fn read_post(r: &mut impl BufRead) -> String {
        let (mut len, mut key) = (0, String::new());
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length: ") {
                len = v.parse().unwrap();
            }
            if let Some(v) = l.strip_prefix("idempotency-key: ") {
                key = v.to_string();
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        key
    }

    #[test]
    fn pipelines_posts_and_reads_answers_in_order() {
        let (port, server) = serve_one(|r, w| {
            let mut keys = Vec::new();
            for i in 0..3 {
                keys.push(read_post(r));
                let status = match i {
                    1 => "422 Unprocessable",
                    2 => "503 Busy",
                    _ => "200 OK",
                };
                let reply = if i == 2 {
                    "transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_string()
                } else {
                    "content-length: 2\r\n\r\nno".to_string()
                };
                w.write_all(format!("HTTP/1.1 {status}\r\n{reply}").as_bytes())
                    .unwrap();
            }
            keys
        });
        let mut c = client(port, 2);
        let answers = c.post_many(&[(b"{}", "a"), (b"{\"x\":1}", "b"), (b"{}", "c")]);
        assert_eq!(
            answers,
            vec![
                Ok((200, String::new())),
                Ok((422, "no".into())),
                Ok((503, "ok".into()))
            ]
        );
        assert_eq!(server.join().unwrap(), vec!["a", "b", "c"]);
        // The server is gone: every answer is an error, and nothing panics.
        let answers = c.post_many(&[(b"{}", "d"), (b"{}", "e")]);
        assert!(answers.iter().all(|a| a.is_err()));
    }

    #[test]
    fn a_batch_started_now_is_answered_when_finished_later() {
        // The server answers only after it has read every POST, and the client reads
        // the answers only at `finish`: `start` waited for none of them.
        let (tx, rx) = std::sync::mpsc::channel();
        let (port, server) = serve_one(move |r, w| {
            let keys: Vec<String> = (0..3).map(|_| read_post(r)).collect();
            tx.send(keys.clone()).unwrap();
            for _ in 0..3 {
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .unwrap();
            }
            keys
        });
        let mut c = client(port, 5);
        assert!(c.start(&[(b"{}", "a"), (b"{}", "b"), (b"{}", "c")]));
        // Every POST reached the server before any answer was read.
        assert_eq!(rx.recv().unwrap(), ["a", "b", "c"]);
        assert_eq!(c.finish(), vec![Ok((200, String::new())); 3]);
        server.join().unwrap();
        // Nothing listens any more: `start` cannot send, and `finish` says so for each.
        let mut c = client(port, 1);
        assert!(!c.start(&[(b"{}", "d"), (b"{}", "e")]));
        let answers = c.finish();
        assert_eq!(answers.len(), 2);
        assert!(answers.iter().all(|a| a.is_err()));
    }

    #[test]
    fn a_repeated_answer_head_is_recognised_and_any_other_is_parsed() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ok2 = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let ok3 = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes";
        let answers: Vec<String> = vec![
            ok2.into(),
            ok2.into(),
            ok2.into(), // sent a byte at a time
            ok3.into(),
            "HTTP/1.1 500 Oops\r\ncontent-length: 4\r\n\r\nfail".into(),
            ok3.into(),
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbye".into(),
        ];
        let n = answers.len();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            for (i, a) in answers.iter().enumerate() {
                if i == 2 {
                    for b in a.as_bytes() {
                        s.write_all(&[*b]).unwrap();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                } else {
                    s.write_all(a.as_bytes()).unwrap();
                }
            }
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let mut c = client(port, 2);
        let items: Vec<(&[u8], &str)> = (0..n).map(|_| (&b"{}"[..], "k")).collect();
        let got = c.post_many(&items);
        let want: Vec<Answer> = vec![
            Ok((200, String::new())),
            Ok((200, String::new())),
            Ok((200, String::new())),
            Ok((200, String::new())),
            Ok((500, "fail".into())),
            Ok((200, String::new())),
            Ok((200, String::new())),
        ];
        assert_eq!(got, want);
        // The last answer closed the connection: it is not kept.
        assert!(c.conn.is_none());
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn a_deep_pipeline_reads_answers_while_it_writes_so_neither_side_waits_on_the_other() {
        // Each side sends far more than the sockets buffer (64 MiB each way): a client
        // that wrote every request before reading an answer would wait on a server
        // that waits for it to read (until the timeout, every round).
        const N: usize = 4096;
        let (port, server) = serve_one(|r, w| {
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: 16384\r\n\r\n{}",
                "a".repeat(16384)
            );
            for _ in 0..N {
                read_post(r);
                w.write_all(answer.as_bytes()).unwrap();
            }
        });
        let mut c = client(port, 5);
        let body = vec![b'x'; 16384];
        let items: Vec<(&[u8], &str)> = (0..N).map(|_| (&body[..], "k")).collect();
        let got = c.post_many(&items);
        assert_eq!(got.len(), N);
        assert!(got.iter().all(|a| a == &Ok((200, String::new()))));
        server.join().unwrap();
    }

    #[test]
    fn the_watch_is_called_before_connecting_and_each_tick_of_a_slow_answer_or_a_pause() {
        // The answer comes ~5 ticks after the POST, and the timeout is far off: the
        // client keeps waiting, calling the watch each tick, and the wait is not cut
        // short by them.
        let (tx, rx) = std::sync::mpsc::channel();
        let (port, server) = serve_one(move |r, w| {
            read_post(r);
            tx.send(()).unwrap();
            std::thread::sleep(5 * WATCH_TICK + WATCH_TICK / 2);
            w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
        });
        let calls: Arc<std::sync::Mutex<Vec<Duration>>> = Arc::default();
        let seen = calls.clone();
        let mut c = client(port, 5);
        c.watch(Arc::new(move |after| seen.lock().unwrap().push(after)));
        assert!(c.start(&[(b"{}", "a")]));
        // Connecting is a wait with no tick: the watch was told first.
        assert_eq!(
            std::mem::take(&mut *calls.lock().unwrap()),
            [Duration::ZERO]
        );
        rx.recv().unwrap();
        let waited = Instant::now();
        assert_eq!(c.finish(), vec![Ok((200, String::new()))]);
        let ticks = waited.elapsed().as_millis() / WATCH_TICK.as_millis();
        server.join().unwrap();
        let got = std::mem::take(&mut *calls.lock().unwrap());
        // One call a tick (a loaded machine may run a tick late, never early).
        assert!(
            got.len() >= 2 && got.len() as u128 <= ticks,
            "{ticks} ticks waited: {got:?}"
        );
        assert!(got.iter().all(|&a| a == 2 * WATCH_TICK), "{got:?}");
        // A retry's pause ticks the same way.
        c.pause(3 * WATCH_TICK);
        assert_eq!(*calls.lock().unwrap(), [2 * WATCH_TICK; 3]);
        // Without a watch, a slow answer is simply waited for.
        let (port, server) = serve_one(|r, w| {
            read_post(r);
            std::thread::sleep(2 * WATCH_TICK);
            w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
        });
        let mut c = client(port, 5);
        assert_eq!(c.post_many(&[(b"{}", "b")]), vec![Ok((200, String::new()))]);
        server.join().unwrap();
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    /// A client for `http://127.0.0.1:{port}/hook` that waits `secs` for each answer.
    fn client(port: u16, secs: u64) -> PlainHttp {
        PlainHttp::new(
            &url(&format!("http://127.0.0.1:{port}/hook")),
            &[],
            None,
            Duration::from_secs(secs),
        )
        .unwrap()
    }

    #[test]
    fn only_plain_http() {
        assert!(PlainHttp::new(&url("https://x/y"), &[], None, Duration::from_secs(1)).is_none());
        let c = PlainHttp::new(
            &url("http://user:pw@bill:9000/a/b?t=1"),
            &[],
            None,
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("bill", 9000));
        assert!(
            c.prefix
                .starts_with(b"POST /a/b?t=1 HTTP/1.1\r\nhost: bill:9000\r\n")
        );
    }

    #[test]
    fn every_post_has_the_prefix_and_its_own_key_and_length() {
        // A port nothing listens on: the bytes are built, then the connection is
        // refused; the request buffer is kept.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let authority = format!("127.0.0.1:{port}");
        let mut c = PlainHttp::new(
            &url(&format!("http://{authority}/hook")),
            &[("x-tenant".into(), "t1".into())],
            None,
            Duration::from_secs(1),
        )
        .unwrap();
        let _ = c.post_many(&[(b"{\"a\":1}", "req_1"), (b"{}", "req_22")]);
        let mut at = 0;
        for (key, body) in [("req_1", &b"{\"a\":1}"[..]), ("req_22", b"{}")] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut r = httparse::Request::new(&mut headers);
            let httparse::Status::Complete(n) = r.parse(&c.req[at..]).unwrap() else {
                panic!("an incomplete head")
            };
            assert_eq!((r.method, r.path), (Some("POST"), Some("/hook")));
            let h: Vec<(&str, &[u8])> = r.headers.iter().map(|h| (h.name, h.value)).collect();
            assert_eq!(
                h,
                [
                    ("host", authority.as_bytes()),
                    ("user-agent", b"llmproxy"),
                    ("content-type", b"application/json"),
                    ("x-tenant", b"t1"),
                    ("idempotency-key", key.as_bytes()),
                    ("content-length", body.len().to_string().as_bytes()),
                ]
            );
            assert_eq!(&c.req[at + n..at + n + body.len()], body);
            at += n + body.len();
        }
        assert_eq!(at, c.req.len());
    }
}
