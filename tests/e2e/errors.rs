//! Every error the proxy answers itself (SPEC.md's table): OpenAI's JSON shape, the
//! right status and code, an X-Request-Id, nothing sent upstream, and no record.

use crate::harness::*;
use serde_json::json;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn assert_error(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["type"].is_string());
    assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()));
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
}

/// Sends raw bytes, returns the response and whether the proxy then closed.
fn raw(addr: &str, bytes: &[u8]) -> (Response, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r, false);
    let mut rest = [0u8; 1];
    let closed = matches!(r.read(&mut rest), Ok(0) | Err(_));
    (resp, closed)
}

#[test]
fn bad_bodies_and_unknown_models() {
    let s = Stack::start();
    let r = request(s.addr(), "POST", "/v1/chat/completions", &[], b"{not json");
    assert_error(&r, 400, "invalid_request");
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[],
        &json!({"messages": []}),
    );
    assert_error(&r, 400, "invalid_request");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model")
    );
    let r = post_json(
        s.addr(),
        "/v1/embeddings",
        &[],
        &json!({"model": "other-model", "input": "x"}),
    );
    assert_error(&r, 404, "model_not_found");
    let r = request(s.addr(), "GET", "/not-an-api", &[], b"");
    assert_error(&r, 404, "not_found");
    // None of these reached the backend, and none produced a record: a later
    // request's record arrives alone.
    assert_eq!(s.backend_saw(), serde_json::Value::Null);
    let sentinel = post_json(s.addr(), "/v1/chat/completions", &[], &chat(false, 1));
    let id = sentinel.header("x-request-id").unwrap();
    s.record(id);
    let all = fetch_records(&s.receiver);
    assert_eq!(all.len(), 1, "{all:?}");
}

#[test]
fn framing_errors_close_the_connection() {
    let s = Stack::start();
    let cases: &[&[u8]] = &[
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        b"GET / HTTP/1.1\r\nhost : a\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        // Chunked applied twice (RFC 9112 §7), on one line or two.
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for c in cases {
        let (r, closed) = raw(s.addr(), c);
        assert_error(&r, 400, "bad_request");
        assert!(
            closed,
            "connection must close after {:?}",
            String::from_utf8_lossy(c)
        );
    }
    // A coding the proxy cannot decode under chunked: 501 (RFC 9112 §6.1), and close.
    let unsupported: &[&[u8]] = &[
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for c in unsupported {
        let (r, closed) = raw(s.addr(), c);
        assert_error(&r, 501, "not_implemented");
        assert!(closed, "{:?}", String::from_utf8_lossy(c));
    }
    assert_eq!(s.backend_saw(), serde_json::Value::Null);
    // The proxy is fine afterwards.
    assert_eq!(
        post_json(s.addr(), "/v1/chat/completions", &[], &chat(false, 1)).status,
        200
    );
}

#[test]
fn chunked_request_bodies_are_accepted() {
    let s = Stack::start();
    let body = chat(false, 2).to_string();
    let (a, b) = body.split_at(10);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nx-request-id: t-chunked-req\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let (r, _) = raw(s.addr(), req.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.record("t-chunked-req")["completion_tokens"], 2);
}

#[test]
fn size_limits() {
    let s = Stack::with(
        "limits:\n  max_request_body: 1KiB\n  max_header_bytes: 2KiB\n",
        &[],
    );
    let mut big = chat(false, 1);
    big["messages"][0]["content"] = json!("x ".repeat(1000));
    let r = post_json(s.addr(), "/v1/chat/completions", &[], &big);
    assert_error(&r, 413, "request_too_large");
    let long = "v".repeat(3000);
    let r = request(s.addr(), "GET", "/v1/models", &[("x-long", &long)], b"");
    assert_error(&r, 431, "headers_too_large");
    assert_eq!(s.backend_saw(), serde_json::Value::Null);
}

#[test]
fn unreachable_backend_is_502_without_record() {
    // A port with nothing listening: bind, note, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let receiver = receiver(&[]);
    let proxy = proxy_with_config(&format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"http://127.0.0.1:{port}\"\nusage_hook:\n  enabled: true\n  url: \"http://{}/x\"\n",
        receiver.addr
    ));
    let r = post_json(&proxy.addr, "/v1/chat/completions", &[], &chat(true, 1));
    assert_error(&r, 502, "backend_unavailable");
    let h = request(&proxy.addr, "GET", "/health", &[], b"");
    assert_eq!(h.status, 503);
    assert_eq!(h.json()["backends"][0]["healthy"], false);
    assert!(h.json()["backends"][0]["last_error"].is_string());
    // Sentinel: the backend comes up on that port; a later request's record arrives,
    // and the 502's would have come before it.
    let _backend = mock(&["--port", &port.to_string()]);
    let mut sentinel = String::new();
    wait_until("the backend answers", 20, || {
        let r = post_json(&proxy.addr, "/v1/chat/completions", &[], &chat(false, 1));
        sentinel = r.header("x-request-id").unwrap_or("").to_string();
        r.status == 200
    });
    wait_record(&receiver, &sentinel);
    let all = fetch_records(&receiver);
    assert_eq!(all.len(), 1, "{all:?}");
}

#[test]
fn silent_backend_is_504_with_timeout_record() {
    let s = Stack::with("limits:\n  first_byte_timeout: 1s\n", &[]);
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-504"), ("x-mock-fail", "hang")],
        &chat(true, 1),
    );
    assert_error(&r, 504, "backend_timeout");
    let rec = s.record("t-504");
    assert_eq!(rec["outcome"], "timeout");
    assert_eq!(rec["status_code"], 504);
    assert_eq!(rec["usage_source"], "none");
}

#[test]
fn shutdown_answers_503_on_open_connections_and_exits_cleanly() {
    let mut s = Stack::start();
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = chat(false, 1).to_string();
    write_request(
        &mut sock,
        "POST",
        "/v1/chat/completions",
        &[("x-request-id", "t-before-term")],
        body.as_bytes(),
        false,
    );
    let mut r = BufReader::new(sock.try_clone().unwrap());
    assert_eq!(read_response(&mut r, false).status, 200);
    // A stream in flight when SIGTERM arrives is finished, not cut.
    let addr = s.addr().to_string();
    let inflight = std::thread::spawn(move || {
        post_json(
            &addr,
            "/v1/chat/completions",
            &[
                ("x-request-id", "t-inflight"),
                ("x-mock-token-delay-ms", "100"),
            ],
            &chat(true, 10),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    s.proxy.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(50));
    write_request(
        &mut sock,
        "POST",
        "/v1/chat/completions",
        &[],
        body.as_bytes(),
        false,
    );
    let resp = read_response(&mut r, false);
    assert_error(&resp, 503, "shutting_down");
    assert_eq!(resp.header("connection"), Some("close"));
    let streamed = inflight.join().unwrap();
    assert!(streamed.complete);
    assert_eq!(
        s.proxy.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        s.proxy.output()
    );
    assert_eq!(s.record("t-inflight")["completion_tokens"], 10);
    s.record("t-before-term");
}
