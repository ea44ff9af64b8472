//! Real processes on loopback: the llmproxy binary, the mock vLLM and the webhook
//! receiver from examples/, each on a port it picks itself and reports.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Proc {
    pub child: Child,
    pub addr: String,
    /// Every line the process printed (stdout and stderr).
    pub lines: Arc<Mutex<Vec<String>>>,
    /// The scratch directory the process was given, if any.
    pub dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// An example binary (mock vLLM, webhook receiver), built on first use with the test's
/// own profile, so a plain `cargo test` works on a fresh clone (scripts/test.sh builds
/// them beforehand; then this is a no-op check).
pub fn example(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    // Tests run from target/<profile>/deps; examples go to target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--examples"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some(profile) => {
                cmd.args([
                    "--profile",
                    if profile == "release" {
                        "release"
                    } else {
                        profile
                    },
                ]);
            }
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            other => Err(format!("`cargo build --examples` failed: {other:?}")),
        }
    });
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} missing ({built:?}): run scripts/test.sh, or `cargo build --examples`",
        path.display()
    );
    path
}

/// The Python with the openai SDK and prometheus_client: LLMPROXY_TEST_PYTHON, else the
/// repository's `.venv` (scripts/test.sh makes it), else `python3`.
pub fn python() -> String {
    std::env::var("LLMPROXY_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
        if std::path::Path::new(venv).exists() {
            venv.into()
        } else {
            "python3".into()
        }
    })
}

pub fn proxy_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_llmproxy"))
}

/// Starts `cmd` and waits for its "listening on ADDR" line.
pub fn spawn(mut cmd: Command) -> Proc {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let addr = line
                    .split("listening on ")
                    .nth(1)
                    .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string());
                // Kept before the address is reported: the caller may read it at once.
                lines.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
            }
        });
    }
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(addr) => Proc {
            child,
            addr,
            lines,
            dir: PathBuf::new(),
        },
        Err(_) => {
            let _ = child.kill();
            panic!(
                "process did not start: {}",
                lines.lock().unwrap().join("\n")
            );
        }
    }
}

pub fn mock(args: &[&str]) -> Proc {
    let mut cmd = Command::new(example("mock_vllm"));
    if !args.contains(&"--port") {
        cmd.args(["--port", "0"]);
    }
    cmd.args(args);
    spawn(cmd)
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// Removes this test process's scratch directories when it exits, passed or failed.
fn clean_at_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn clean() {
        let prefix = format!("llmproxy-test-{}-", std::process::id());
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    // SAFETY: registers a plain extern "C" function with no captured state.
    ONCE.call_once(|| unsafe {
        libc::atexit(clean);
    });
}

pub fn temp_dir() -> PathBuf {
    clean_at_exit();
    let d = std::env::temp_dir().join(format!(
        "llmproxy-test-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A receiver on a port it picks.
pub fn receiver(args: &[&str]) -> Proc {
    receiver_on(0, args)
}

/// Whether the server at `path` (a Debian package) can be used. Missing, a test says
/// so and passes, unless `require_env` is set (scripts/test.sh sets it after installing
/// `package`), where a missing server fails it.
pub fn installed(path: &str, require_env: &str, package: &str) -> bool {
    if std::path::Path::new(path).exists() {
        return true;
    }
    assert!(
        std::env::var(require_env).is_err(),
        "{path} is not installed (apt-get install {package})"
    );
    eprintln!("skipped: {path} is not installed");
    false
}

/// A port with nothing listening on it (bound, noted, released), below the kernel's
/// ephemeral range: a server stopped and started again on it (a broker outage, a
/// receiver brought back) must not find it taken meanwhile by some test's outgoing
/// connection, which draws its local port from that range (seen in CI: RabbitMQ could
/// not come back on its port).
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    let (lo, hi) = (10_000, first_ephemeral.max(10_100));
    let start = std::process::id() as usize * 7_919;
    for _ in 0..(hi - lo) {
        let port = (lo + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % (hi - lo)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {hi}");
}

/// A receiver on a given port (to bring one back where the proxy expects it).
pub fn receiver_on(port: u16, args: &[&str]) -> Proc {
    let dir = temp_dir();
    let mut cmd = Command::new(example("webhook_receiver"));
    cmd.args(["--port", &port.to_string(), "--quiet", "--log"])
        .arg(dir.join("usage_log.jsonl"))
        .arg("--raw-log")
        .arg(dir.join("raw.jsonl"))
        .args(args);
    let mut p = spawn(cmd);
    p.dir = dir;
    p
}

/// The value of an unlabelled metric.
pub fn metric(addr: &str, name: &str) -> f64 {
    let text = request(addr, "GET", "/metrics", &[], b"").text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Waits until `f` holds, or fails with `what`.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn proxy_with_config(yaml: &str) -> Proc {
    let dir = temp_dir();
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut cmd = Command::new(proxy_bin());
    // Relative paths in the config (the default spool dir) land in the test's own dir.
    cmd.arg("--config").arg(&path).current_dir(&dir);
    let mut p = spawn(cmd);
    p.dir = dir;
    p
}

/// A proxy in front of one mock backend, delivering to one receiver.
pub struct Stack {
    pub proxy: Proc,
    pub mock: Proc,
    pub receiver: Proc,
}

impl Stack {
    pub fn start() -> Stack {
        Stack::with("", &[])
    }

    /// `extra`: YAML appended to the config (top-level keys).
    pub fn with(extra: &str, mock_args: &[&str]) -> Stack {
        Stack::with_backend("", extra, mock_args)
    }

    /// `backend_extra`: YAML lines added to the backend (indented by 4 spaces).
    pub fn with_backend(backend_extra: &str, extra: &str, mock_args: &[&str]) -> Stack {
        let mock = mock(mock_args);
        let receiver = receiver(&[]);
        let proxy = proxy_with_config(&format!(
            "listen: \"127.0.0.1:0\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n    models: [mock-model]\n{backend_extra}usage_hook:\n  enabled: true\n  url: \"http://{}/llm-usage\"\n  timeout: 2s\n  retry: 2\n{extra}",
            mock.addr, receiver.addr
        ));
        Stack {
            proxy,
            mock,
            receiver,
        }
    }

    pub fn addr(&self) -> &str {
        &self.proxy.addr
    }

    /// Waits until the receiver holds at least `n` records, then returns them all.
    pub fn records(&self, n: usize) -> Vec<Value> {
        wait_records(&self.receiver, n)
    }

    pub fn record(&self, request_id: &str) -> Value {
        wait_record_or(&self.receiver, request_id, || {
            format!("proxy log:\n{}", self.proxy.output())
        })
    }

    /// What the mock backend last received.
    pub fn backend_saw(&self) -> Value {
        let r = request(&self.mock.addr, "GET", "/mock/last", &[], b"");
        serde_json::from_slice(&r.body).unwrap()
    }
}

pub fn fetch_records(receiver: &Proc) -> Vec<Value> {
    let r = request(&receiver.addr, "GET", "/records", &[], b"");
    serde_json::from_slice::<Vec<Value>>(&r.body).unwrap_or_default()
}

/// Whether record `r` is the one of `id`: the proxy's own request id, or the caller's
/// `X-Request-Id` (kept as `client_request_id`).
pub fn is_record_of(r: &Value, id: &str) -> bool {
    r["request_id"] == id || r["client_request_id"] == id
}

/// Waits (up to 15 s) until the receiver holds the record of `request_id` (the proxy's
/// id or the caller's trace id).
pub fn wait_record(receiver: &Proc, request_id: &str) -> Value {
    wait_record_or(receiver, request_id, String::new)
}

/// `wait_record`, with `context()` added to the failure message.
fn wait_record_or(receiver: &Proc, request_id: &str, context: impl Fn() -> String) -> Value {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let all = fetch_records(receiver);
        if let Some(r) = all.iter().find(|r| is_record_of(r, request_id)) {
            return r.clone();
        }
        assert!(
            Instant::now() < end,
            "no record for {request_id}; have {all:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn wait_records(receiver: &Proc, n: usize) -> Vec<Value> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let all = fetch_records(receiver);
        if all.len() >= n || Instant::now() > end {
            return all;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Every record POST the receiver accepted, duplicates included.
pub fn raw_posts(receiver: &Proc) -> Vec<Value> {
    let text = std::fs::read_to_string(receiver.dir.join("raw.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body ended as framed (false: the connection closed mid-body).
    pub complete: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|ev| ev.strip_prefix("data: ").map(str::to_owned))
            .collect()
    }
}

pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write_request(&mut s, method, path, headers, body, true);
    read_response(&mut BufReader::new(s), method == "HEAD")
}

pub fn post_json(addr: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    request(addr, "POST", path, &h, body.to_string().as_bytes())
}

pub fn write_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    if close {
        req.push_str("connection: close\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).unwrap();
}

pub fn read_head(r: &mut BufReader<TcpStream>) -> Option<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).ok()?;
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Some((status, headers))
}

pub fn read_response(r: &mut BufReader<TcpStream>, head_only: bool) -> Response {
    let (status, headers) = read_head(r).expect("response head");
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
        complete: true,
    };
    if head_only {
        return resp;
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                resp.complete = false;
                break;
            }
            let Ok(size) = usize::from_str_radix(line.trim(), 16) else {
                resp.complete = false;
                break;
            };
            if size == 0 {
                let mut end = String::new();
                let _ = r.read_line(&mut end);
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size + 2, 0);
            if r.read_exact(&mut resp.body[start..]).is_err() {
                resp.complete = false;
                break;
            }
            resp.body.truncate(start + size);
        }
    } else if let Some(len) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        resp.body.resize(len, 0);
        resp.complete = r.read_exact(&mut resp.body).is_ok();
    } else {
        let _ = r.read_to_end(&mut resp.body);
    }
    resp
}

pub fn chat(stream: bool, max_tokens: u64) -> Value {
    serde_json::json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "one two three four five"}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// `n` chat requests (stream or not, alternately) from 8 threads at once, each with
/// the caller id `prefix-i`; each must be answered 200. Returns the ids.
pub fn send_chats(addr: &str, n: usize, prefix: &str) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let handles: Vec<_> = ids
        .chunks(n.div_ceil(8).max(1))
        .map(|chunk| {
            let (addr, chunk) = (addr.to_string(), chunk.to_vec());
            std::thread::spawn(move || {
                for id in chunk {
                    let r = post_json(
                        &addr,
                        "/v1/chat/completions",
                        &[("x-request-id", &id)],
                        &chat(id.len() % 2 == 0, 2),
                    );
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    ids
}
