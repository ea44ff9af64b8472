//! Hostile input: slow and idle peers, stalled readers, connection floods, smuggling,
//! malformed requests, a backend that sends garbage or dies at any byte, and secrets
//! that must never show up in logs, metrics or records.

use crate::harness::*;
use serde_json::json;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Reads until the peer closes; returns what arrived and how long it took.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration, bool) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (all, start.elapsed(), true),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (all, start.elapsed(), true),
        }
    }
    (all, start.elapsed(), false)
}

#[test]
fn slowloris_is_cut_at_header_timeout() {
    let s = Stack::with("limits:\n  header_timeout: 1s\n", &[]);
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    sock.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    let start = Instant::now();
    // One header byte every 200 ms: never finishing the head.
    let trickle = {
        let mut w = sock.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..40 {
                if w.write_all(b"X").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let (got, _, closed) = read_until_closed(&mut sock, Duration::from_secs(6));
    assert!(closed, "a trickling head must be cut");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        start.elapsed()
    );
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    drop(trickle);
    // Other callers were never affected.
    assert_eq!(
        post_json(s.addr(), "/v1/chat/completions", &[], &chat(false, 1)).status,
        200
    );
}

#[test]
fn a_caller_silent_past_the_deferred_accept_is_still_served() {
    // The listener defers an accept until the first bytes come, for at most 1 s; a
    // caller quiet for longer is accepted without them, and its request still read.
    let s = Stack::start();
    let mut quiet = TcpStream::connect(s.addr()).unwrap();
    let mut prompt = TcpStream::connect(s.addr()).unwrap();
    write_request(&mut prompt, "GET", "/health", &[], b"", false);
    let mut r = BufReader::new(prompt.try_clone().unwrap());
    assert_eq!(read_response(&mut r, false).status, 200);
    std::thread::sleep(Duration::from_millis(2500));
    write_request(&mut quiet, "GET", "/health", &[], b"", false);
    let mut r = BufReader::new(quiet.try_clone().unwrap());
    assert_eq!(read_response(&mut r, false).status, 200);
}

#[test]
fn idle_keep_alive_connections_are_closed_at_idle_timeout() {
    let s = Stack::with("limits:\n  idle_timeout: 1s\n", &[]);
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    write_request(&mut sock, "GET", "/health", &[], b"", false);
    let mut r = BufReader::new(sock.try_clone().unwrap());
    assert_eq!(read_response(&mut r, false).status, 200);
    let (_, took, closed) = read_until_closed(&mut sock, Duration::from_secs(5));
    assert!(
        closed && took < Duration::from_secs(3),
        "closed={closed} after {took:?}"
    );
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn a_caller_that_stops_reading_holds_bounded_memory_and_slows_no_one() {
    let s = Stack::start();
    let pid = s.proxy.child.id();
    let before = rss_kib(pid);
    // Ask for a 200k-token stream (tens of MB) and never read it.
    let mut stalled = Vec::new();
    for i in 0..4 {
        let mut sock = TcpStream::connect(s.addr()).unwrap();
        write_request(
            &mut sock,
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-request-id", &format!("stall-{i}")),
            ],
            chat(true, 200_000).to_string().as_bytes(),
            false,
        );
        stalled.push(sock);
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB with stalled readers"
    );
    // Everyone else is served as usual meanwhile.
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(
            post_json(s.addr(), "/v1/chat/completions", &[], &chat(true, 5)).status,
            200
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(stalled);
    // Each stalled stream still gets its record once the caller is gone.
    for i in 0..4 {
        assert_eq!(
            s.record(&format!("stall-{i}"))["outcome"],
            "client_disconnected"
        );
    }
}

#[test]
fn a_connection_flood_is_answered_503_beyond_the_limit() {
    let s = Stack::with("limits:\n  max_connections: 50\n", &[]);
    // 2 workers × 50: open 300 connections and hold them.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        let sock = TcpStream::connect(s.addr()).unwrap();
        held.push(sock);
    }
    // Silent, they are accepted once the listener's deferral (1 s) runs out; each
    // refusal is read as it comes.
    let mut answered = vec![false; held.len()];
    let end = Instant::now() + Duration::from_secs(10);
    while refused < 180 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        for (sock, answered) in held.iter_mut().zip(answered.iter_mut()) {
            if *answered {
                continue;
            }
            sock.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 512];
            if let Ok(n) = sock.read(&mut buf)
                && n > 0
            {
                *answered = true;
                if String::from_utf8_lossy(&buf[..n]).contains("too_many_connections") {
                    refused += 1;
                }
            }
        }
    }
    assert!(
        refused >= 180,
        "only {refused} of 300 got 503 over a limit of 100"
    );
    // Over the limit, a new connection is answered 503 rather than left hanging.
    assert_eq!(request_on_fresh(&s), 503);
    drop(held);
    // Once they are gone the proxy serves as usual.
    wait_until("connections released", 10, || {
        post_json(s.addr(), "/v1/chat/completions", &[], &chat(false, 1)).status == 200
    });
    assert!(metric(s.addr(), "llmproxy_connections_rejected_total") >= 180.0);
}

fn request_on_fresh(s: &Stack) -> u16 {
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = sock.write_all(b"GET /health HTTP/1.1\r\nhost: a\r\n\r\n");
    let mut buf = [0u8; 64];
    let n = sock.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_request_smuggled_after_a_body_is_its_own_request() {
    let s = Stack::start();
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Content-Length says 5: the GET after it is a second request (answered by the proxy
    // itself), never part of the body the backend receives.
    sock.write_all(b"POST /tokenize HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhelloGET /health HTTP/1.1\r\nhost: a\r\n\r\n").unwrap();
    let mut r = BufReader::new(sock);
    let first = read_response(&mut r, false);
    assert_eq!(first.status, 200);
    let saw = s.backend_saw();
    assert_eq!(saw["path"], "/tokenize");
    assert_eq!(
        saw["body"], "hello",
        "the body is exactly Content-Length bytes"
    );
    let second = read_response(&mut r, false);
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["status"], "ok");
}

#[test]
fn more_malformed_requests_are_refused_and_never_forwarded() {
    let s = Stack::start();
    let long_ext = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
        "a".repeat(5000)
    );
    let cases: &[&[u8]] = &[
        long_ext.as_bytes(),
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nx: a\r\n  folded\r\ncontent-length: 2\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\rx: b\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nbad header: a\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\n",
        // A coding the proxy does not implement: 501 (RFC 9112 §6.1).
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: identity\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 01\r\n\r\n{",
    ];
    for c in cases {
        let mut sock = TcpStream::connect(s.addr()).unwrap();
        sock.write_all(c).unwrap();
        let _ = sock.shutdown(std::net::Shutdown::Write);
        let (got, _, closed) = read_until_closed(&mut sock, Duration::from_secs(5));
        let text = String::from_utf8_lossy(&got);
        let want = if c.windows(8).any(|w| w == b"identity") {
            "HTTP/1.1 501"
        } else {
            "HTTP/1.1 400"
        };
        assert!(
            text.starts_with(want),
            "{:?} -> {text}",
            String::from_utf8_lossy(c)
        );
        assert!(closed);
    }
    assert_eq!(
        s.backend_saw(),
        serde_json::Value::Null,
        "a malformed request reached the backend"
    );
}

/// A fake backend that answers every request with `reply` and closes.
fn garbage_backend(reply: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let reply = reply.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut got = Vec::new();
                // Read the head and body (the proxy always sends a content-length).
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..p]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        if got.len() >= p + 4 + len {
                            break;
                        }
                    }
                }
                let _ = c.write_all(&reply);
            });
        }
    });
    (addr, h)
}

fn proxy_to(backend: &str, receiver: &Proc) -> Proc {
    proxy_with_config(&format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"http://{backend}\"\nusage_hook:\n  enabled: true\n  url: \"http://{}/x\"\nlimits:\n  first_byte_timeout: 2s\n",
        receiver.addr
    ))
}

#[test]
fn upstream_garbage_gives_clean_errors_and_honest_records() {
    let rx = receiver(&[]);
    let sse_head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("invalid-http", b"SMTP READY\r\n\r\n".to_vec(), 502, "backend_error"),
        ("endless-header", [b"HTTP/1.1 200 OK\r\nx: ".to_vec(), vec![b'a'; 200_000]].concat(), 502, "backend_error"),
        ("huge-chunk", format!("{sse_head}10000000000000000\r\nxx").into_bytes(), 200, "backend_error"),
        ("not-json", format!("{sse_head}{}{}0\r\n\r\n", chunk("data: {{{not json\n\n"), chunk("data: [DONE]\n\n")).into_bytes(), 200, "completed"),
        ("negative-usage", format!("{sse_head}{}{}0\r\n\r\n",
            chunk("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n"),
            chunk("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":1e30,\"total_tokens\":-1}}\n\n")).into_bytes(), 200, "completed"),
    ];
    for (name, reply, status, outcome) in cases {
        let (addr, _h) = garbage_backend(reply);
        let p = proxy_to(&addr, &rx);
        let id = format!("garbage-{name}");
        let r = post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-request-id", &id)],
            &chat(true, 3),
        );
        assert_eq!(r.status, status, "{name}: {}", r.text());
        let rec = wait_record(&rx, &id);
        assert_eq!(rec["outcome"], outcome, "{name}: {rec}");
        if name == "negative-usage" {
            assert_eq!(
                rec["usage_source"], "estimated",
                "absurd usage is not billed: {rec}"
            );
        }
        // The worker lives on.
        assert!(matches!(
            request(&p.addr, "GET", "/health", &[], b"").status,
            200 | 503
        ));
    }
}

#[test]
fn a_backend_closing_at_any_byte_never_hurts_the_proxy() {
    let rx = receiver(&[]);
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let full = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{}{}{}0\r\n\r\n",
        chunk("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n"),
        chunk("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n"),
        chunk("data: [DONE]\n\n")
    )
    .into_bytes();
    let step = 7;
    let mut k = 0;
    while k < full.len() {
        let (addr, _h) = garbage_backend(full[..k].to_vec());
        let p = proxy_to(&addr, &rx);
        let r = post_json(&p.addr, "/v1/chat/completions", &[], &chat(true, 1));
        // Either a clean 502 (nothing of a head arrived) or the bytes that came, marked
        // as truncated.
        assert!(
            r.status == 502 || (r.status == 200 && !r.complete),
            "cut at {k}: {} complete={}",
            r.status,
            r.complete
        );
        // The worker lives on to answer the next request.
        assert!(matches!(
            post_json(
                &p.addr,
                "/v1/embeddings",
                &[],
                &json!({"model": "x", "input": "y"})
            )
            .status,
            200 | 502
        ));
        k += step;
    }
}

#[test]
fn no_full_secret_in_logs_metrics_or_records() {
    let dir = temp_dir();
    let mock = mock(&[]);
    let rx = receiver(&[]);
    let access = dir.join("access.jsonl");
    let p = proxy_with_config(&format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\naccess_log: \"{}\"\nbackends:\n  - url: \"http://{}\"\n    api_key: sk-backend-secret-aaaaaaaa\nusage_hook:\n  enabled: true\n  url: \"http://{}/x\"\n  headers:\n    Authorization: Bearer hook-secret-bbbbbbbb\nauth:\n  enabled: true\n  keys:\n    - {{key: sk-caller-secret-cccccccc, user_id: u}}\n",
        access.display(),
        mock.addr,
        rx.addr
    ));
    let good = [("authorization", "Bearer sk-caller-secret-cccccccc")];
    post_json(&p.addr, "/v1/chat/completions", &good, &chat(true, 2));
    post_json(&p.addr, "/v1/chat/completions", &good, &chat(false, 2));
    post_json(
        &p.addr,
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-wrong-secret-dddddddd")],
        &chat(false, 2),
    );
    post_json(
        &p.addr,
        "/v1/chat/completions",
        &good,
        &json!({"model": "nope"}),
    );
    request(&p.addr, "GET", "/v1/models", &good, b"");
    // The backend key is what the backend sees, and only the backend.
    let saw =
        serde_json::to_string(&request(&mock.addr, "GET", "/mock/last", &[], b"").json()).unwrap();
    assert!(saw.contains("sk-backend-secret-aaaaaaaa"));
    assert!(!saw.contains("sk-caller-secret-cccccccc"));
    wait_records(&rx, 2);
    wait_until("access log", 10, || {
        std::fs::read_to_string(&access).map_or(0, |t| t.lines().count()) >= 5
    });
    let everything = format!(
        "{}\n{}\n{}\n{}",
        p.output(),
        request(&p.addr, "GET", "/metrics", &[], b"").text(),
        std::fs::read_to_string(&access).unwrap(),
        serde_json::to_string(&fetch_records(&rx)).unwrap()
    );
    for secret in [
        "sk-backend-secret-aaaaaaaa",
        "hook-secret-bbbbbbbb",
        "sk-caller-secret-cccccccc",
        "sk-wrong-secret-dddddddd",
    ] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked:\n{everything}"
        );
    }
}
