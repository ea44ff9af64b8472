//! llama.cpp's llama-server shapes (the mock's `--flavor llamacpp`): the defects a real
//! server showed, each with its regression test. `scripts/real-llama.sh` runs the real
//! server.

use crate::harness::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn stack(mode: &str) -> Stack {
    Stack::with_backend(
        &format!("    usage_mode: {mode}\n"),
        "",
        &["--flavor", "llamacpp"],
    )
}

#[test]
fn continuous_mode_keeps_the_final_usage_a_caller_asked_for() {
    // llama.cpp puts a completion stream's usage on its last event with choices: in
    // continuous mode the proxy used to strip it although the caller asked for it.
    let s = stack("continuous");
    let body = json!({"model": "mock-model", "prompt": "a b c", "max_tokens": 3, "stream": true,
                      "stream_options": {"include_usage": true}});
    let r = post_json(
        s.addr(),
        "/v1/completions",
        &[("x-request-id", "t-ll-final")],
        &body,
    );
    let events = r.sse_data();
    let with_usage: Vec<&String> = events.iter().filter(|e| e.contains("\"usage\"")).collect();
    assert_eq!(with_usage.len(), 1, "{events:?}");
    let last: Value = serde_json::from_str(with_usage[0]).unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 3);
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let rec = s.record("t-ll-final");
    assert_eq!(
        (
            rec["prompt_tokens"].as_u64(),
            rec["completion_tokens"].as_u64()
        ),
        (Some(3), Some(3))
    );
}

#[test]
fn a_completion_stream_without_usage_asked_shows_none() {
    // The usage the proxy asked for comes on llama.cpp's last event with choices: it
    // is taken out there, the event itself forwarded.
    let s = stack("final");
    let body = json!({"model": "mock-model", "prompt": "a b", "max_tokens": 3, "stream": true});
    let r = post_json(
        s.addr(),
        "/v1/completions",
        &[("x-request-id", "t-ll-hidden")],
        &body,
    );
    let text = r.text();
    assert!(!text.contains("\"usage\""), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.contains("\"timings\""), "{text}");
    let rec = s.record("t-ll-hidden");
    assert_eq!(
        (
            rec["prompt_tokens"].as_u64(),
            rec["completion_tokens"].as_u64(),
            rec["usage_source"].as_str()
        ),
        (Some(2), Some(3), Some("backend"))
    );
}

#[test]
fn a_caller_that_did_not_ask_for_usage_still_gets_the_timings() {
    let s = stack("final");
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-ll-timings")],
        &chat(true, 4),
    );
    let text = r.text();
    assert!(!text.contains("\"usage\""), "usage leaked: {text}");
    let timed: Vec<Value> = r
        .sse_data()
        .iter()
        .filter(|e| e.contains("\"timings\""))
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(timed.len(), 1, "{text}");
    assert_eq!(timed[0]["timings"]["predicted_n"], 4);
    assert!(text.contains(": ping"), "comments pass through");
    assert_eq!(s.record("t-ll-timings")["completion_tokens"], 4);
}

#[test]
fn a_hang_up_on_llamacpp_is_billed_partial_from_its_timings() {
    let s = stack("llamacpp_timings");
    let body = chat(true, 300).to_string();
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\nx-request-id: t-ll-gone\r\nx-mock-token-delay-ms: 20\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < 3000 {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("\"timings\""),
        "per-token timings leaked: {text}"
    );
    drop(sock);
    let rec = s.record("t-ll-gone");
    assert_eq!(rec["outcome"], "client_disconnected");
    assert_eq!(rec["usage_source"], "partial", "{rec}");
    assert_eq!(
        rec["prompt_tokens"], 5,
        "the prompt as the server counted it"
    );
    let c = rec["completion_tokens"].as_u64().unwrap();
    assert!(c > 0 && c < 300, "{rec}");
    let sent: Value = serde_json::from_str(s.backend_saw()["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["timings_per_token"], true);
    // Read to the end, the record is the backend's final usage.
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-ll-whole")],
        &chat(true, 6),
    );
    assert!(!r.text().contains("\"usage\""));
    let rec = s.record("t-ll-whole");
    assert_eq!(
        (
            rec["completion_tokens"].as_u64(),
            rec["usage_source"].as_str()
        ),
        (Some(6), Some("backend"))
    );
}

#[test]
fn the_merged_model_list_keeps_the_backends_other_fields() {
    let s = stack("final");
    let m = request(s.addr(), "GET", "/v1/models", &[], b"").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "mock-model");
    assert_eq!(m["models"][0]["name"], "mock-model", "{m}");
}
