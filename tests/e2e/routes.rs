//! The route table end to end: every metered route gives one record with the backend's
//! exact numbers, streamed and not; routes forwarded with a record give one with zero
//! usage; anything else is refused and never reaches the backend.

use crate::harness::*;
use serde_json::{Value, json};
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// POSTs `body` to `path` on the proxy, with the caller id `id`; returns the response
/// and the record.
fn metered(s: &Stack, path: &str, id: &str, body: &Value) -> (Response, Value) {
    let r = post_json(s.addr(), path, &[("x-request-id", id)], body);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let rec = s.record(id);
    assert_eq!(rec["endpoint"], path, "{rec}");
    (r, rec)
}

fn counts(rec: &Value) -> (u64, u64, u64) {
    (
        rec["prompt_tokens"].as_u64().unwrap(),
        rec["completion_tokens"].as_u64().unwrap(),
        rec["total_tokens"].as_u64().unwrap(),
    )
}

#[test]
fn responses_api_is_metered_streamed_and_not() {
    let s = Stack::start();
    let body = json!({"model": "mock-model", "input": "one two three", "max_output_tokens": 4});
    let (r, rec) = metered(&s, "/v1/responses", "t-resp", &body);
    assert_eq!(r.json()["usage"]["output_tokens"], 4);
    assert_eq!(counts(&rec), (3, 4, 7));
    assert_eq!(
        (rec["usage_source"].as_str(), rec["is_stream"].as_bool()),
        (Some("backend"), Some(false))
    );
    assert_eq!(
        rec["usage_details"]["input_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(
        rec["usage_details"]["output_tokens_details"]["reasoning_tokens"],
        0
    );
    // Nothing was added to what the backend received.
    let sent: Value = serde_json::from_str(s.backend_saw()["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent, body);

    // Streamed, in reads of 7 bytes: named events, no [DONE], usage in
    // response.completed. The caller gets the backend's bytes exactly.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let via = post_json(
        s.addr(),
        "/v1/responses",
        &[("x-request-id", "t-resp-s"), ("x-mock-split", "7")],
        &sb,
    );
    let direct = post_json(&s.mock.addr, "/v1/responses", &[], &sb);
    assert_eq!(via.text(), direct.text());
    assert!(via.text().contains("event: response.completed\n"));
    let rec = s.record("t-resp-s");
    assert_eq!(counts(&rec), (3, 4, 7));
    assert_eq!(
        (rec["outcome"].as_str(), rec["usage_source"].as_str()),
        (Some("completed"), Some("backend"))
    );
    assert!(rec["ttft_ms"].is_u64());
    let sent: Value = serde_json::from_str(s.backend_saw()["body"].as_str().unwrap()).unwrap();
    assert!(
        sent.get("stream_options").is_none(),
        "no stream_options on /v1/responses"
    );
}

#[test]
fn background_responses_are_refused_unless_allowed() {
    let s = Stack::start();
    let body = json!({"model": "mock-model", "input": "x", "background": true});
    let r = post_json(s.addr(), "/v1/responses", &[], &body);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_request");
    assert!(r.text().contains("background"), "{}", r.text());
    assert_eq!(s.backend_saw(), Value::Null);

    let s = Stack::with("routes:\n  allow_background: true\n", &[]);
    let r = post_json(
        s.addr(),
        "/v1/responses",
        &[("x-request-id", "t-bg")],
        &body,
    );
    assert_eq!(r.status, 200);
    let rec = s.record("t-bg");
    assert_eq!(rec["usage_source"], "none");
    assert_eq!(counts(&rec), (0, 0, 0));
}

#[test]
fn anthropic_messages_are_metered_streamed_and_not() {
    let s = Stack::start();
    let body = json!({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "a b c d"}]});
    let (r, rec) = metered(&s, "/v1/messages", "t-msg", &body);
    assert_eq!(r.json()["usage"]["output_tokens"], 5);
    assert_eq!(counts(&rec), (4, 5, 9));
    assert_eq!(rec["usage_details"]["cache_read_input_tokens"], 0);

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let via = post_json(
        s.addr(),
        "/v1/messages",
        &[("x-request-id", "t-msg-s"), ("x-mock-split", "5")],
        &sb,
    );
    let direct = post_json(&s.mock.addr, "/v1/messages", &[], &sb);
    assert_eq!(via.text(), direct.text());
    assert!(via.text().ends_with("data: [DONE]\n\n"));
    let rec = s.record("t-msg-s");
    assert_eq!(counts(&rec), (4, 5, 9));
    assert_eq!(rec["usage_source"], "backend");
    assert!(rec["ttft_ms"].is_u64());
}

#[test]
fn anthropic_errors_come_in_anthropics_shape() {
    let s = Stack::with(
        "auth:\n  enabled: true\n  keys:\n    - {key: sk-anthropic-test-0123456789, user_id: a}\n",
        &[],
    );
    let body = json!({"model": "mock-model", "max_tokens": 5, "messages": []});
    let r = post_json(s.addr(), "/v1/messages", &[], &body);
    assert_eq!(r.status, 401);
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = post_json(
        s.addr(),
        "/v1/messages",
        &[
            ("x-api-key", "sk-anthropic-test-0123456789"),
            ("anthropic-version", "2023-06-01"),
        ],
        &json!({"model": "no-such-model", "max_tokens": 1, "messages": []}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    // The key reached nobody; anthropic-version went through.
    let r = post_json(
        s.addr(),
        "/v1/messages",
        &[
            ("x-api-key", "sk-anthropic-test-0123456789"),
            ("anthropic-version", "2023-06-01"),
        ],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let saw = s.backend_saw();
    assert_eq!(saw["headers"]["anthropic-version"], "2023-06-01");
    assert!(saw["headers"].get("x-api-key").is_none());
    // Other routes keep OpenAI's shape.
    let r = post_json(s.addr(), "/v1/chat/completions", &[], &chat(false, 1));
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
}

#[test]
fn pooling_family_routes_are_metered() {
    let s = Stack::start();
    let cases = [
        (
            "/rerank",
            json!({"model": "mock-model", "query": "q w", "documents": ["a b", "c"]}),
            5,
        ),
        (
            "/v1/rerank",
            json!({"model": "mock-model", "query": "q", "documents": ["a"]}),
            2,
        ),
        (
            "/v2/rerank",
            json!({"model": "mock-model", "query": "q", "documents": ["a b c"]}),
            4,
        ),
        (
            "/score",
            json!({"model": "mock-model", "text_1": "a b", "text_2": "c"}),
            3,
        ),
        (
            "/v1/score",
            json!({"model": "mock-model", "text_1": "a", "text_2": "c d e"}),
            4,
        ),
        (
            "/pooling",
            json!({"model": "mock-model", "input": "a b c d e"}),
            5,
        ),
        (
            "/classify",
            json!({"model": "mock-model", "input": ["a", "b c"]}),
            3,
        ),
        (
            "/v2/embed",
            json!({"model": "mock-model", "texts": ["a b"], "input_type": "search_document"}),
            2,
        ),
    ];
    for (i, (path, body, n)) in cases.iter().enumerate() {
        let (_, rec) = metered(&s, path, &format!("t-pool-{i}"), body);
        assert_eq!(rec["prompt_tokens"], *n, "{path}: {rec}");
        assert_eq!(rec["total_tokens"], *n, "{path}: {rec}");
        assert_eq!(rec["usage_source"], "backend", "{path}");
    }
}

fn multipart(boundary: &str, fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        if *name == "file" {
            b.extend_from_slice(
                b"Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n",
            );
        } else {
            b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            );
        }
        b.extend_from_slice(value);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    b
}

#[test]
fn audio_transcriptions_are_metered_streamed_and_not() {
    let s = Stack::start();
    let audio = vec![7u8; 48_000];
    let ctype = "multipart/form-data; boundary=llmproxy-test-boundary";
    let body = multipart(
        "llmproxy-test-boundary",
        &[("file", &audio), ("model", b"mock-model")],
    );
    for (i, path) in ["/v1/audio/transcriptions", "/v1/audio/translations"]
        .iter()
        .enumerate()
    {
        let id = format!("t-audio-{i}");
        let r = request(
            s.addr(),
            "POST",
            path,
            &[("content-type", ctype), ("x-request-id", &id)],
            &body,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let rec = s.record(&id);
        assert_eq!(rec["endpoint"], *path);
        assert_eq!(rec["model"], "mock-model");
        // Billed in audio seconds, passed through as the backend reported them.
        assert_eq!(
            rec["usage_details"],
            json!({"type": "duration", "seconds": 3}),
            "{rec}"
        );
        assert_eq!(rec["usage_source"], "backend");
        // The audio reached the backend unchanged.
        assert_eq!(
            s.backend_saw()["body"].as_str().unwrap().len(),
            String::from_utf8_lossy(&body).len()
        );
    }
    // Streamed: the proxy asks for the usage (a form field) and hides it from a caller
    // that did not ask; the caller's bytes are what the backend sends without it.
    let body = multipart(
        "llmproxy-test-boundary",
        &[
            ("model", b"mock-model"),
            ("stream", b"true"),
            ("file", &audio),
        ],
    );
    let via = request(
        s.addr(),
        "POST",
        "/v1/audio/transcriptions",
        &[
            ("content-type", ctype),
            ("x-request-id", "t-audio-s"),
            ("x-mock-tokens", "6"),
        ],
        &body,
    );
    assert_eq!(via.status, 200);
    let saw = s.backend_saw();
    assert!(
        saw["body"]
            .as_str()
            .unwrap()
            .starts_with("--llmproxy-test-boundary\r\nContent-Disposition: form-data; name=\"stream_include_usage\"\r\n\r\ntrue\r\n")
    );
    let direct = request(
        &s.mock.addr,
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", ctype), ("x-mock-tokens", "6")],
        &body,
    );
    assert_eq!(via.text(), direct.text());
    assert!(!via.text().contains("\"usage\""));
    let rec = s.record("t-audio-s");
    assert_eq!(counts(&rec), (48, 6, 54));
    assert_eq!(
        (rec["is_stream"].as_bool(), rec["usage_source"].as_str()),
        (Some(true), Some("backend"))
    );

    // No model field: 400 in OpenAI's shape, nothing forwarded.
    let s2 = Stack::start();
    let r = request(
        s2.addr(),
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", ctype)],
        &multipart("llmproxy-test-boundary", &[("file", b"x")]),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_request");
    assert_eq!(s2.backend_saw(), Value::Null);
}

#[test]
fn forwarded_routes_get_a_record_with_zero_usage() {
    let s = Stack::start();
    let cases: [(&str, &str, Value, &str); 5] = [
        (
            "POST",
            "/v1/messages/count_tokens",
            json!({"model": "mock-model", "messages": [{"role": "user", "content": "a b"}]}),
            "/v1/messages/count_tokens",
        ),
        (
            "POST",
            "/tokenize",
            json!({"model": "mock-model", "prompt": "a b c"}),
            "/tokenize",
        ),
        (
            "POST",
            "/detokenize",
            json!({"model": "mock-model", "tokens": [1, 2]}),
            "/detokenize",
        ),
        (
            "GET",
            "/v1/responses/resp_abc123",
            Value::Null,
            "/v1/responses/{id}",
        ),
        (
            "POST",
            "/v1/responses/resp_abc123/cancel",
            Value::Null,
            "/v1/responses/{id}/cancel",
        ),
    ];
    for (i, (method, path, body, endpoint)) in cases.iter().enumerate() {
        let id = format!("t-rec-{i}");
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let r = request(
            s.addr(),
            method,
            path,
            &[("content-type", "application/json"), ("x-request-id", &id)],
            &bytes,
        );
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let rec = s.record(&id);
        assert_eq!(rec["endpoint"], *endpoint);
        assert_eq!(rec["usage_source"], "none");
        assert_eq!(counts(&rec), (0, 0, 0));
        assert_eq!(rec["outcome"], "completed");
        if !body.is_null() {
            assert_eq!(rec["model"], "mock-model");
        }
    }
}

#[test]
fn admin_and_unknown_paths_are_refused_and_never_forwarded() {
    let s = Stack::start();
    for (method, path) in [
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/invocations"),
        ("POST", "/sleep"),
        ("POST", "/wake_up"),
        ("POST", "/pause"),
        ("POST", "/collective_rpc"),
        ("POST", "/reset_prefix_cache"),
        ("POST", "/start_profile"),
        ("GET", "/v1/files"),
        ("GET", "/version"),
        ("DELETE", "/v1/responses/resp_1"),
        ("GET", "/v1/chat/completions"),
    ] {
        let r = request(
            s.addr(),
            method,
            path,
            &[("content-type", "application/json")],
            b"{\"lora_name\":\"x\",\"lora_path\":\"/tmp\"}",
        );
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.json()["error"]["code"], "not_found");
    }
    assert_eq!(
        s.backend_saw(),
        Value::Null,
        "an admin path reached the backend"
    );
    // Sentinel: a later request's record arrives alone.
    let r = post_json(s.addr(), "/v1/chat/completions", &[], &chat(false, 1));
    s.record(r.header("x-request-id").unwrap());
    assert_eq!(fetch_records(&s.receiver).len(), 1);
}

#[test]
fn extra_routes_are_forwarded_with_a_record() {
    let s = Stack::with(
        "routes:\n  extra:\n    - {path: /v1/custom/echo}\n    - {path: /v1/custom/generate, metered: true}\n",
        &[],
    );
    let r = post_json(
        s.addr(),
        "/v1/custom/echo",
        &[("x-request-id", "t-extra")],
        &json!({"x": 1}),
    );
    assert_eq!(r.status, 404, "the mock does not know it: {}", r.text());
    let rec = s.record("t-extra");
    assert_eq!(rec["endpoint"], "/v1/custom/echo");
    assert_eq!(rec["usage_source"], "none");
    assert_eq!(rec["outcome"], "backend_error");
    let m = request(s.addr(), "GET", "/metrics", &[], b"").text();
    assert!(m.contains("path=\"extra\""), "{m}");
}

/// Reads a streamed response until `n` bytes of body have come, then hangs up.
fn hang_up_after(addr: &str, path: &str, id: &str, body: &Value, n: usize) {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let b = body.to_string();
    write!(
        sock,
        "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\nx-request-id: {id}\r\nx-mock-token-delay-ms: 30\r\ncontent-length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut r = BufReader::new(sock);
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < n {
        let k = r.read(&mut buf).unwrap();
        assert!(k > 0, "stream ended early");
        got.extend_from_slice(&buf[..k]);
    }
    drop(r);
}

#[test]
fn a_caller_hanging_up_mid_stream_still_gets_a_record() {
    let s = Stack::start();
    let body = json!({"model": "mock-model", "input": "one two", "max_output_tokens": 200, "stream": true});
    hang_up_after(s.addr(), "/v1/responses", "t-resp-gone", &body, 1500);
    let rec = s.record("t-resp-gone");
    assert_eq!(rec["outcome"], "client_disconnected");
    // The Responses stream has no running usage: estimated from the deltas.
    assert_eq!(rec["usage_source"], "estimated");
    assert!(rec["completion_tokens"].as_u64().unwrap() > 0);
    assert!(rec["completion_tokens"].as_u64().unwrap() < 200);

    let body = json!({"model": "mock-model", "max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "a b c"}]});
    hang_up_after(s.addr(), "/v1/messages", "t-msg-gone", &body, 1500);
    let rec = s.record("t-msg-gone");
    assert_eq!(rec["outcome"], "client_disconnected");
    // The input from message_start (the backend's running usage), the output counted.
    assert_eq!(rec["prompt_tokens"], 3);
    assert_eq!(rec["usage_source"], "estimated");
    let c = rec["completion_tokens"].as_u64().unwrap();
    assert!(c > 0 && c < 200, "{rec}");
    assert_eq!(rec["total_tokens"].as_u64(), Some(3 + c));
}

#[test]
fn a_20_mb_upload_is_relayed_in_constant_memory() {
    let s = Stack::with("limits:\n  max_request_body: 64KiB\n", &[]);
    let pid = s.proxy.child.id();
    let ctype = "multipart/form-data; boundary=llmproxy-big-upload";
    // Warm up (worker buffers, the pool) with a small upload first.
    let small = multipart(
        "llmproxy-big-upload",
        &[("model", b"mock-model"), ("file", &[1u8; 1000])],
    );
    let r = request(
        s.addr(),
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", ctype)],
        &small,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let before = crate::hostile::rss_kib(pid);
    let audio: Vec<u8> = (0..20 << 20).map(|i: u32| (i % 251) as u8).collect();
    let body = multipart(
        "llmproxy-big-upload",
        &[
            ("model", b"mock-model"),
            ("language", b"en"),
            ("file", &audio),
        ],
    );
    let r = request(
        s.addr(),
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", ctype), ("x-request-id", "t-big")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let after = crate::hostile::rss_kib(pid);
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB relaying a 20 MB upload"
    );
    let rec = s.record("t-big");
    // 20 MiB at 16,000 bytes a second.
    assert_eq!(rec["usage_details"]["seconds"], (20u64 << 20) / 16_000);
    // The backend got every byte (it counted them).
    assert_eq!(r.json()["usage"]["seconds"], (20u64 << 20) / 16_000);

    // A model named after a file larger than what the proxy holds: 400, and the
    // connection closes (the rest of the body is unread).
    let late = multipart(
        "llmproxy-big-upload",
        &[("file", &audio[..200_000]), ("model", b"mock-model")],
    );
    let r = request(
        s.addr(),
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", ctype)],
        &late,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("must come before the file"),
        "{}",
        r.text()
    );
    // A small one in that order is read whole and served.
    let late = multipart(
        "llmproxy-big-upload",
        &[("file", &audio[..20_000]), ("model", b"mock-model")],
    );
    let r = request(
        s.addr(),
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", ctype)],
        &late,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}
