//! A small load generator for drills: N keep-alive connections POSTing chat
//! completions (half streamed) for a while, each with its own X-Request-Id (kept in
//! the record as client_request_id), writing
//! the ids that got a complete 200 to a file so a drill can check every one of them
//! reached billing. Connection failures (a proxy restart) are retried, not counted.
//!
//!     cargo run --release --example loadgen -- --addr 127.0.0.1:8080 --seconds 50
//!         [--concurrency 8] [--key sk-...] [--model mock-model] [--ids-out ids.txt]

#[path = "common/http.rs"]
mod http;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn main() {
    let addr = http::flag("--addr").unwrap_or_else(|| "127.0.0.1:8080".into());
    let seconds: u64 = http::flag("--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let conc: usize = http::flag("--concurrency")
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let key = http::flag("--key").unwrap_or_default();
    let model = http::flag("--model").unwrap_or_else(|| "mock-model".into());
    let ids_out = http::flag("--ids-out");
    let end = Instant::now() + Duration::from_secs(seconds);
    let ok = Arc::new(Mutex::new(Vec::<String>::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let run = std::process::id();
    let threads: Vec<_> = (0..conc)
        .map(|t| {
            let (addr, key, model, ok, failed) = (addr.clone(), key.clone(), model.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                let mut n = 0u64;
                while Instant::now() < end {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match TcpStream::connect(&addr) {
                            Ok(s) => {
                                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                                conn.insert(BufReader::new(s))
                            }
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                        },
                    };
                    n += 1;
                    let id = format!("load-{run}-{t}-{n}");
                    let stream = n.is_multiple_of(2);
                    let body = format!(
                        "{{\"model\":\"{model}\",\"stream\":{stream},\"max_tokens\":8,\"messages\":[{{\"role\":\"user\",\"content\":\"one two three\"}}]}}"
                    );
                    let req = format!(
                        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\nx-request-id: {id}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    match exchange(c, req.as_bytes()) {
                        Some((200, true, keep)) => {
                            ok.lock().unwrap().push(id);
                            if !keep {
                                conn = None;
                            }
                        }
                        Some((_, _, keep)) => {
                            failed.fetch_add(1, Relaxed);
                            if !keep {
                                conn = None;
                            }
                        }
                        None => {
                            // The connection broke (a restart): the request may or may not
                            // have been answered, so it is not counted either way.
                            conn = None;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let ok = ok.lock().unwrap();
    if let Some(path) = ids_out {
        let _ = std::fs::write(&path, ok.join("\n") + "\n");
    }
    println!(
        "loadgen: {} requests answered 200, {} answered otherwise",
        ok.len(),
        failed.load(Relaxed)
    );
}

/// Sends one request; returns (status, body complete, keep-alive).
fn exchange(c: &mut BufReader<TcpStream>, req: &[u8]) -> Option<(u16, bool, bool)> {
    c.get_mut().write_all(req).ok()?;
    let mut line = String::new();
    if c.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let (mut len, mut chunked, mut keep) = (None, false, true);
    loop {
        let mut h = String::new();
        c.read_line(&mut h).ok()?;
        let h = h.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        } else if h.starts_with("transfer-encoding:") && h.contains("chunked") {
            chunked = true;
        } else if h.starts_with("connection:") && h.contains("close") {
            keep = false;
        }
    }
    if chunked {
        loop {
            let mut size = String::new();
            if c.read_line(&mut size).ok()? == 0 {
                return Some((status, false, false));
            }
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut buf = vec![0u8; n + 2];
            if c.read_exact(&mut buf).is_err() {
                return Some((status, false, false));
            }
            if n == 0 {
                return Some((status, true, keep));
            }
        }
    }
    let mut buf = vec![0u8; len.unwrap_or(0)];
    let complete = c.read_exact(&mut buf).is_ok();
    Some((status, complete, keep && complete))
}
