//! Records with exact counts for every endpoint, stream and not; the stream_options
//! injection and the hiding of the usage-only chunk; time to first byte; auth and
//! request ids; one record per request under concurrency; failures mid-stream.

use crate::harness::*;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn stream_gets_exact_record_and_hides_injected_usage_chunk() {
    let s = Stack::start();
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-stream-1")],
        &chat(true, 5),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    // The proxy's own id, never the caller's (that is a trace id in the record).
    let id = r.header("x-request-id").unwrap().to_string();
    assert!(id.starts_with("req_"), "{id}");
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = r.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(
            !v["choices"].as_array().unwrap().is_empty(),
            "usage-only chunk leaked to caller: {e}"
        );
        assert!(v.get("usage").is_none());
    }
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(content, "tok0 tok1 tok2 tok3 tok4 ");

    let saw = s.backend_saw();
    let sent: Value = serde_json::from_str(saw["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true}),
        "usage must be requested upstream"
    );
    assert_eq!(saw["headers"]["x-request-id"], id.as_str());

    let rec = s.record("t-stream-1");
    assert_eq!(rec["request_id"], id.as_str());
    assert_eq!(rec["client_request_id"], "t-stream-1");
    assert_eq!(rec["prompt_tokens"], 5);
    assert_eq!(rec["completion_tokens"], 5);
    assert_eq!(rec["total_tokens"], 10);
    assert_eq!(rec["is_stream"], true);
    assert_eq!(rec["endpoint"], "/v1/chat/completions");
    assert_eq!(rec["model"], "mock-model");
    assert_eq!(rec["outcome"], "completed");
    assert_eq!(rec["usage_source"], "backend");
    assert_eq!(rec["status_code"], 200);
    assert_eq!(rec["backend_url"], format!("http://{}", s.mock.addr));
    assert!(rec["ttft_ms"].is_u64());
    assert!(rec["timestamp"].as_str().unwrap().ends_with('Z'));
}

/// The backend's prefill is what `ttft_ms` measures: the first token after 150 ms,
/// then four more 20 ms apart, gives a ttft of about 150 ms inside a longer duration.
#[test]
fn ttft_is_the_backends_time_to_the_first_token() {
    let s = Stack::start();
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[
            ("x-request-id", "t-ttft"),
            ("x-mock-prefill-ms", "150"),
            ("x-mock-token-delay-ms", "20"),
        ],
        &chat(true, 5),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = s.record("t-ttft");
    let ttft = rec["ttft_ms"].as_u64().unwrap();
    let duration = rec["duration_ms"].as_u64().unwrap();
    assert!((150..1000).contains(&ttft), "ttft {ttft} ms");
    assert!(
        duration >= ttft + 80,
        "duration {duration} ms, ttft {ttft} ms"
    );
}

#[test]
fn caller_who_asked_for_usage_keeps_the_usage_chunk() {
    let s = Stack::start();
    let mut body = chat(true, 3);
    body["stream_options"] = json!({"include_usage": true});
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-usage-asked")],
        &body,
    );
    let events = r.sse_data();
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert_eq!(s.record("t-usage-asked")["total_tokens"], 8);
}

#[test]
fn stream_split_into_tiny_writes_still_metered_and_hidden() {
    let s = Stack::start();
    let r = post_json(
        s.addr(),
        "/v1/completions",
        &[("x-request-id", "t-split"), ("x-mock-split", "7")],
        &json!({"model": "mock-model", "prompt": "a b c", "max_tokens": 4, "stream": true}),
    );
    let events = r.sse_data();
    assert_eq!(events.len(), 6, "4 tokens + finish + [DONE]: {events:?}");
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));
    let rec = s.record("t-split");
    assert_eq!(
        (
            rec["prompt_tokens"].as_u64(),
            rec["completion_tokens"].as_u64()
        ),
        (Some(3), Some(4))
    );
    assert_eq!(rec["endpoint"], "/v1/completions");
}

#[test]
fn non_stream_and_embeddings_records() {
    let s = Stack::start();
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-plain")],
        &chat(false, 7),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 7);
    let rec = s.record("t-plain");
    assert_eq!(
        (
            rec["prompt_tokens"].as_u64(),
            rec["completion_tokens"].as_u64(),
            rec["total_tokens"].as_u64()
        ),
        (Some(5), Some(7), Some(12))
    );
    assert_eq!(rec["is_stream"], false);
    assert!(rec["ttft_ms"].is_null());
    // Nothing is injected into non-streams (vLLM would answer 400).
    let saw = s.backend_saw();
    assert!(!saw["body"].as_str().unwrap().contains("stream_options"));

    // A large embeddings body is relayed intact and metered.
    let r = post_json(
        s.addr(),
        "/v1/embeddings",
        &[
            ("x-request-id", "t-embed"),
            ("x-mock-embedding-dim", "200000"),
        ],
        &json!({"model": "mock-model", "input": ["alpha beta", "gamma"]}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["data"][0]["embedding"].as_array().unwrap().len(),
        200000
    );
    let rec = s.record("t-embed");
    assert_eq!(
        (rec["prompt_tokens"].as_u64(), rec["total_tokens"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(rec["endpoint"], "/v1/embeddings");
}

#[test]
fn first_chunk_is_not_held_back() {
    let s = Stack::start();
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    let body = chat(true, 3).to_string();
    let started = Instant::now();
    write_request(
        &mut sock,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-mock-pause-after-first-ms", "3000"),
        ],
        body.as_bytes(),
        true,
    );
    let mut r = BufReader::new(sock);
    let (status, _) = read_head(&mut r).unwrap();
    assert_eq!(status, 200);
    let mut seen = String::new();
    while !seen.contains("tok0") {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "stream ended before the first token"
        );
        seen.push_str(&line);
    }
    let first = started.elapsed();
    // The backend pauses 3 s after its first token; the caller must have it long before.
    assert!(
        first < Duration::from_millis(1500),
        "first token took {first:?}"
    );
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(started.elapsed() >= Duration::from_millis(2900));
}

#[test]
fn auth_maps_keys_to_users_and_never_forwards_the_key() {
    let s = Stack::with(
        "auth:\n  enabled: true\n  keys:\n    - key: sk-test-alice-0123456789\n      user_id: alice\n    - key: sk-test-bob-0123456789ab\n      user_id: bob\n",
        &[],
    );
    let r = post_json(s.addr(), "/v1/chat/completions", &[], &chat(false, 1));
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert!(r.header("x-request-id").unwrap().starts_with("req_"));
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-wrong")],
        &chat(false, 1),
    );
    assert_eq!(r.status, 401);

    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[
            ("authorization", "Bearer sk-test-alice-0123456789"),
            ("x-request-id", "t-alice"),
        ],
        &chat(false, 2),
    );
    assert_eq!(r.status, 200);
    let saw = s.backend_saw();
    assert!(
        saw["headers"].get("authorization").is_none(),
        "caller key leaked upstream: {saw}"
    );
    let rec = s.record("t-alice");
    assert_eq!(rec["user_id"], "alice");
    assert_eq!(rec["api_key"], "sk-tes...6789");

    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[
            ("x-api-key", "sk-test-bob-0123456789ab"),
            ("x-request-id", "t-bob"),
        ],
        &chat(true, 2),
    );
    assert_eq!(r.status, 200);
    assert!(s.backend_saw()["headers"].get("x-api-key").is_none());
    assert_eq!(s.record("t-bob")["user_id"], "bob");
    // /health and /metrics need no key.
    assert_eq!(request(s.addr(), "GET", "/health", &[], b"").status, 200);
    assert_eq!(request(s.addr(), "GET", "/metrics", &[], b"").status, 200);
    assert_eq!(request(s.addr(), "GET", "/v1/models", &[], b"").status, 401);
}

#[test]
fn without_auth_user_comes_from_header_or_body_and_key_passes_through() {
    let s = Stack::start();
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[
            ("x-user-id", "u-header"),
            ("authorization", "Bearer sk-caller-key-123456789"),
            ("x-request-id", "t-hdr"),
        ],
        &chat(false, 1),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        s.backend_saw()["headers"]["authorization"],
        "Bearer sk-caller-key-123456789"
    );
    let rec = s.record("t-hdr");
    assert_eq!(rec["user_id"], "u-header");
    assert_eq!(rec["api_key"], "sk-cal...6789");
    let mut body = chat(false, 1);
    body["user"] = json!("u-body");
    post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-body")],
        &body,
    );
    let rec = s.record("t-body");
    assert_eq!(rec["user_id"], "u-body");
    assert_eq!(rec["api_key"], "");
}

#[test]
fn request_ids_are_always_the_proxys_and_a_caller_id_is_only_a_trace_id() {
    let s = Stack::start();
    // Two requests with the same caller id: two records with distinct ids, both
    // delivered (a deduplicating receiver keeps both).
    let same = "Abc.1_2:3-4";
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = post_json(
            s.addr(),
            "/v1/chat/completions",
            &[("x-request-id", same)],
            &chat(false, 1),
        );
        assert_eq!(r.status, 200);
        let id = r.header("x-request-id").unwrap().to_string();
        assert!(id.starts_with("req_") && id.len() == 36, "{id}");
        assert_eq!(s.backend_saw()["headers"]["x-request-id"], id.as_str());
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        let rec = s.record(id);
        assert_eq!(rec["client_request_id"], same);
    }
    let keys: Vec<String> = raw_posts(&s.receiver)
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.iter().all(|id| keys.contains(id)), "{keys:?}");
    // An invalid caller id is not kept at all.
    for bad in ["has space".to_string(), "a".repeat(129)] {
        let r = post_json(
            s.addr(),
            "/v1/chat/completions",
            &[("x-request-id", &bad)],
            &chat(false, 1),
        );
        let id = r.header("x-request-id").unwrap().to_string();
        assert!(id.starts_with("req_") && id.len() == 36, "{id}");
        assert_eq!(s.record(&id)["client_request_id"], Value::Null);
    }
    // Generated ids are time-ordered and unique, errors included.
    let ids: Vec<String> = (0..20)
        .map(|_| {
            request(s.addr(), "GET", "/nope", &[("x-request-id", same)], b"")
                .header("x-request-id")
                .unwrap()
                .to_string()
        })
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 20);
    assert!(sorted.iter().all(|i| i.starts_with("req_")));
}

#[test]
fn one_record_per_request_under_200_concurrent_requests() {
    let s = Stack::with("", &["--token-delay-ms", "2"]);
    let addr = s.addr().to_string();
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let id = format!("t-conc-{i}");
                let stream = i % 2 == 0;
                let r = post_json(
                    &addr,
                    "/v1/chat/completions",
                    &[("x-request-id", &id)],
                    &chat(stream, 1 + i % 7),
                );
                assert_eq!(r.status, 200, "{}", r.text());
                (id, 1 + i % 7)
            })
        })
        .collect();
    let expected: Vec<(String, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let records = s.records(200);
    assert_eq!(records.len(), 200);
    for (id, completion) in expected {
        let r = records
            .iter()
            .find(|r| is_record_of(r, &id))
            .unwrap_or_else(|| panic!("missing {id}"));
        assert_eq!(r["completion_tokens"].as_u64(), Some(completion));
        assert_eq!(r["prompt_tokens"], 5);
    }
    // The receiver counts every POST: none was sent twice (a sentinel's record comes
    // after any repeat would have).
    let sentinel = post_json(s.addr(), "/v1/chat/completions", &[], &chat(false, 1));
    s.record(sentinel.header("x-request-id").unwrap());
    assert_eq!(raw_posts(&s.receiver).len(), 201);
}

#[test]
fn keep_alive_and_pipelined_requests_answered_in_order() {
    use std::io::Write;
    let s = Stack::start();
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut all = Vec::new();
    for (i, stream) in [(1, true), (2, false), (3, true)] {
        let body = chat(stream, i).to_string();
        all.extend_from_slice(format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nx-request-id: t-pipe-{i}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes());
    }
    sock.write_all(&all).unwrap();
    let mut r = BufReader::new(sock);
    for _ in 1..=3 {
        let resp = read_response(&mut r, false);
        assert_eq!(resp.status, 200);
        assert!(resp.header("x-request-id").unwrap().starts_with("req_"));
    }
    for i in 1..=3u64 {
        assert_eq!(
            s.record(&format!("t-pipe-{i}"))["completion_tokens"].as_u64(),
            Some(i)
        );
    }
}

#[test]
fn backend_dying_mid_stream_is_visible_and_billed() {
    let s = Stack::start();
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-reset"), ("x-mock-fail", "reset")],
        &chat(true, 10),
    );
    assert_eq!(r.status, 200);
    assert!(
        !r.complete,
        "a truncated stream must not look complete: {}",
        r.text()
    );
    let rec = s.record("t-reset");
    assert_eq!(rec["outcome"], "backend_error");
    assert_eq!(rec["status_code"], 200);
    assert_eq!(rec["usage_source"], "estimated");
    assert_eq!(rec["completion_tokens"], 2);
    assert_eq!(rec["prompt_tokens"], 0);

    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-errev"), ("x-mock-fail", "error-event")],
        &chat(true, 10),
    );
    assert!(r.complete);
    assert!(r.text().contains("mock engine failure"));
    let rec = s.record("t-errev");
    assert_eq!(rec["outcome"], "backend_error");
    assert_eq!(rec["completion_tokens"], 1);

    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-500"), ("x-mock-fail", "status-500")],
        &chat(false, 1),
    );
    assert_eq!(r.status, 500);
    let rec = s.record("t-500");
    assert_eq!(
        (
            rec["outcome"].as_str(),
            rec["status_code"].as_u64(),
            rec["usage_source"].as_str()
        ),
        (Some("backend_error"), Some(500), Some("none"))
    );
}

/// Starts a 200-token stream (a token every 50 ms) and reads until `token` arrived.
fn slow_stream_until(addr: &str, id: &str, token: &str) -> (BufReader<TcpStream>, String) {
    let mut sock = TcpStream::connect(addr).unwrap();
    write_request(
        &mut sock,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", id),
            ("x-mock-token-delay-ms", "50"),
        ],
        chat(true, 200).to_string().as_bytes(),
        true,
    );
    let mut r = BufReader::new(sock);
    read_head(&mut r).unwrap();
    let mut seen = String::new();
    while !seen.contains(token) {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        seen.push_str(&line);
    }
    (r, seen)
}

#[test]
fn caller_hanging_up_mid_stream_still_gets_a_record() {
    let s = Stack::start();
    let (r, _) = slow_stream_until(s.addr(), "t-hangup", "tok2");
    drop(r);
    let rec = s.record("t-hangup");
    assert_eq!(rec["outcome"], "client_disconnected");
    assert_eq!(rec["usage_source"], "estimated");
    let n = rec["completion_tokens"].as_u64().unwrap();
    assert!((3..20).contains(&n), "billed {n} deltas");
    // The backend was cut off: its stream of 200 tokens at 50 ms would take 10 s.
    assert!(rec["duration_ms"].as_u64().unwrap() < 3000);
}

/// The metric names a section of docs/metrics.md lists.
fn listed_in(docs: &str, heading: &str) -> std::collections::BTreeSet<String> {
    docs.split(&format!("\n## {heading}\n"))
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap_or_else(|| panic!("a section {heading}"))
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("llmproxy_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_metric_the_docs_list_is_served() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md"))
        .expect("docs/metrics.md");
    let listed = listed_in(&docs, "Metrics");
    assert!(listed.len() >= 15, "{listed:?}");
    let s = Stack::start();
    let m = request(s.addr(), "GET", "/metrics", &[], b"").text();
    for name in listed {
        assert!(
            m.contains(&format!("# TYPE {name} ")),
            "docs/metrics.md lists {name}, /metrics does not serve it:\n{m}"
        );
    }
    // The optional parts' metrics, with those parts on (a limits store that is not
    // there still has its gauge); the TLS ones are read in tests/e2e/tls.rs.
    let optional = listed_in(&docs, "Metrics of optional parts");
    assert!(optional.len() >= 2, "{optional:?}");
    let s = Stack::with(
        &format!("limits_store: \"redis://127.0.0.1:{}/0\"\n", free_port()),
        &[],
    );
    let m = request(s.addr(), "GET", "/metrics", &[], b"").text();
    for name in optional.iter().filter(|n| !n.starts_with("llmproxy_tls_")) {
        assert!(
            m.contains(&format!("# TYPE {name} ")),
            "docs/metrics.md lists {name}, /metrics does not serve it:\n{m}"
        );
    }
}

#[test]
fn models_health_and_metrics() {
    let s = Stack::start();
    let r = request(s.addr(), "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "mock-model");
    let h = request(s.addr(), "GET", "/health", &[], b"").json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["backends"][0]["healthy"], true);
    assert_eq!(h["backends"][0]["in_flight"], 0);
    post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-m")],
        &chat(true, 4),
    );
    s.record("t-m");
    let mut m = String::new();
    for _ in 0..100 {
        m = request(s.addr(), "GET", "/metrics", &[], b"").text();
        if m.contains("llmproxy_webhook_success_total 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let backend = format!("backend=\"{}\"", s.mock.addr);
    assert!(m.contains(&format!("llmproxy_requests_total{{path=\"/v1/chat/completions\",stream=\"true\",{backend},status=\"200\"}} 1")), "{m}");
    assert!(m.contains("llmproxy_usage_tokens_total{type=\"prompt\"} 5"));
    assert!(m.contains("llmproxy_usage_tokens_total{type=\"completion\"} 4"));
    assert!(m.contains("llmproxy_webhook_success_total 1"));
    assert!(m.contains("llmproxy_webhook_failure_total 0"));
    assert!(m.contains("llmproxy_ttft_ms_count 1"));
    assert!(m.contains("llmproxy_latency_ms_count"));
}

fn continuous() -> Stack {
    Stack::with_backend("    usage_mode: continuous\n", "", &[])
}

fn chunks(r: &Response) -> Vec<Value> {
    r.sse_data()
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[test]
fn continuous_mode_asks_for_running_usage_and_hides_it_from_callers() {
    let s = continuous();
    let r = post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "t-cont")],
        &chat(true, 4),
    );
    assert!(r.complete);
    let sent: Value = serde_json::from_str(s.backend_saw()["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true, "continuous_usage_stats": true})
    );
    let got = chunks(&r);
    assert!(
        got.iter()
            .all(|c| c.get("usage").is_none() && !c["choices"].as_array().unwrap().is_empty()),
        "{got:?}"
    );
    let text: String = got
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 ");
    let rec = s.record("t-cont");
    assert_eq!(
        (
            rec["completion_tokens"].as_u64(),
            rec["usage_source"].as_str()
        ),
        (Some(4), Some("backend"))
    );

    // Asked for the final usage only: gets exactly that.
    let mut body = chat(true, 2);
    body["stream_options"] = json!({"include_usage": true});
    let got = chunks(&post_json(s.addr(), "/v1/chat/completions", &[], &body));
    let (last, rest) = got.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 2);
    assert!(rest.iter().all(|c| c.get("usage").is_none()));

    // Asked for continuous stats too: untouched.
    body["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
    let got = chunks(&post_json(s.addr(), "/v1/chat/completions", &[], &body));
    assert!(got.iter().all(|c| c["usage"]["prompt_tokens"] == 5));
}

#[test]
fn continuous_mode_bills_a_hang_up_from_the_backends_running_count() {
    let s = continuous();
    let (r, seen) = slow_stream_until(s.addr(), "t-cont-hangup", "tok3");
    assert!(!seen.contains("usage"));
    drop(r);
    let rec = s.record("t-cont-hangup");
    assert_eq!(rec["outcome"], "client_disconnected");
    assert_eq!(rec["usage_source"], "partial");
    assert_eq!(
        rec["prompt_tokens"], 5,
        "the backend's own prompt count, not an estimate"
    );
    let c = rec["completion_tokens"].as_u64().unwrap();
    assert!((4..20).contains(&c), "{c}");
    assert_eq!(rec["total_tokens"].as_u64(), Some(5 + c));
}
