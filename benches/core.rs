//! Micro-benchmarks of the per-byte and per-request work: the SSE scanner, the stream
//! meter, the JSON usage finder, the request rewrite, head parsing, record
//! serialization, billing's stages per record (ring, segment, webhook POST), the
//! continuous-mode usage strip, and a request's metrics counting
//! (one worker, and two on two cores next to the shared-line design it replaced), and
//! the per-key limits (admission, lookup among 10,000 keys, loading them).
//!
//!     cargo bench --bench core
//!
//! Targets on the reference 2-core machine: scanner >= 2 GB/s on realistic vLLM
//! chunks; rewrite of a 1 KiB body < 2 us.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use llmproxy::config::UsageMode;
use llmproxy::http::body::{BodyDecoder, Framing};
use llmproxy::http::head::RequestHead;
use llmproxy::json::member_span;
use llmproxy::metrics::{Metrics, WorkerMetrics};
use llmproxy::relay::body::{BodyRelay, Edits, Mode};
use llmproxy::relay::rewrite;
use llmproxy::routes::{StreamShape, UsageAt};
use llmproxy::sse::SseScanner;
use llmproxy::usage::finder::UsageFinder;
use llmproxy::usage::{Outcome, StreamMeter, Usage, UsageRecord, UsageSource};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One vLLM chat chunk per token, as vLLM writes them (one event per write).
fn vllm_events(tokens: usize) -> Vec<Vec<u8>> {
    let mut events = Vec::new();
    for i in 0..tokens {
        events.push(format!(
            "data: {{\"id\":\"chatcmpl-9f2a1c7e0b3d4a5f8e6c\",\"object\":\"chat.completion.chunk\",\"created\":1768386600,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        ).into_bytes());
    }
    events.push(b"data: {\"id\":\"chatcmpl-9f2a1c7e0b3d4a5f8e6c\",\"object\":\"chat.completion.chunk\",\"created\":1768386600,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[],\"usage\":{\"prompt_tokens\":15,\"total_tokens\":271,\"completion_tokens\":256}}\n\n".to_vec());
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

fn sse(c: &mut Criterion) {
    let events = vllm_events(256);
    let bytes: usize = events.iter().map(Vec::len).sum();
    let mut g = c.benchmark_group("sse_scanner");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("vllm_stream_event_per_read", |b| {
        let mut s = SseScanner::new();
        b.iter(|| {
            s.reset();
            let mut n = 0usize;
            for e in &events {
                s.feed(e, |ev| n += ev.data.len());
            }
            black_box(n)
        })
    });
    let joined = events.concat();
    g.bench_function("vllm_stream_4k_reads", |b| {
        let mut s = SseScanner::new();
        b.iter(|| {
            s.reset();
            let mut n = 0usize;
            for chunk in joined.chunks(4096) {
                s.feed(chunk, |ev| n += ev.data.len());
            }
            black_box(n)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("stream_meter");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("scan_and_meter_vllm_stream", |b| {
        let mut s = SseScanner::new();
        b.iter(|| {
            s.reset();
            let mut m = StreamMeter::new();
            for e in &events {
                s.feed(e, |ev| {
                    m.observe(ev.data);
                });
            }
            black_box(m.finish(true))
        })
    });
    g.finish();
}

/// A chunked SSE response body as the load benchmark's mock (and vLLM) writes it: one
/// event per chunk, the usage-only chunk, `[DONE]`, the last chunk.
fn chunked_stream(tokens: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for e in vllm_events(tokens) {
        out.extend_from_slice(format!("{:x}\r\n", e.len()).as_bytes());
        out.extend_from_slice(&e);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// The response body path of one streamed request, as `benches/load.sh`'s SSE scenario
/// drives it: the backend's chunked body decoded, scanned, metered and re-framed for a
/// chunked caller, the usage-only chunk the proxy asked for cut (the caller did not ask
/// for usage), the whole body in one read.
fn relay_body(c: &mut Criterion) {
    let body = chunked_stream(64);
    let mut g = c.benchmark_group("relay_body");
    g.throughput(Throughput::Bytes(body.len() as u64));
    let mode = Mode::Sse(Edits {
        hide_usage_only: true,
        ..Edits::default()
    });
    for (name, mode) in [
        ("sse_64_tokens_hide_usage", mode),
        ("sse_64_tokens_as_is", Mode::Sse(Edits::default())),
    ] {
        g.bench_function(name, |b| {
            let mut relay = BodyRelay::default();
            let mut out = Vec::new();
            b.iter(|| {
                relay.start(mode, true, StreamShape::Chat, UsageAt::Usage);
                out.clear();
                let mut d = BodyDecoder::new(Framing::Chunked);
                let n = d.decode_framed(&body, |span, whole| relay.on_chunk(span, whole, &mut out));
                relay.finish(&mut out);
                assert!(d.is_done() && n == Ok(body.len()));
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn usage_json(c: &mut Criterion) {
    let mut body =
        br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":["#.to_vec();
    while body.len() < 1 << 20 {
        body.extend_from_slice(b"0.0123456789,-0.987654321,");
    }
    body.extend_from_slice(br#"1.0]}],"model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}"#);
    let mut g = c.benchmark_group("usage_finder");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("embeddings_1MiB", |b| {
        b.iter(|| {
            let mut f = UsageFinder::new();
            for chunk in body.chunks(16 * 1024) {
                f.feed(chunk);
            }
            black_box(f.usage().map(<[u8]>::len))
        })
    });
    // A vLLM chat completion as the backend sends it (one read, ~1 KiB).
    let chat = br#"{"id":"chatcmpl-9f2a1c7e0b3d4a5f8e6c","object":"chat.completion","created":1768386600,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"message":{"role":"assistant","content":"The capital of France is Paris. It has been the country's capital since the 10th century and is its largest city, with about two million people in the city proper and over twelve million in the metropolitan area.","refusal":null,"annotations":null,"audio":null,"function_call":null,"tool_calls":[],"reasoning_content":null},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"service_tier":null,"system_fingerprint":null,"usage":{"prompt_tokens":15,"total_tokens":62,"completion_tokens":47,"prompt_tokens_details":null},"prompt_logprobs":null,"kv_transfer_params":null}"#;
    g.throughput(Throughput::Bytes(chat.len() as u64));
    let mut f = UsageFinder::new();
    g.bench_function("chat_completion_1KiB", |b| {
        b.iter(|| {
            f.reset();
            f.feed(black_box(chat));
            black_box(f.usage().map(<[u8]>::len))
        })
    });
    g.finish();

    let chunk = br#"{"id":"chatcmpl-9f2a","object":"chat.completion.chunk","created":1768386600,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":{"content":" token"},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":15,"total_tokens":40,"completion_tokens":25}}"#;
    c.bench_function("continuous_strip_per_chunk", |b| {
        let mut out = Vec::with_capacity(512);
        b.iter(|| {
            out.clear();
            if let Some(r) = member_span(black_box(chunk), b"usage") {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&chunk[..r.start]);
                out.extend_from_slice(&chunk[r.end..]);
                out.extend_from_slice(b"\n\n");
            }
            black_box(out.len())
        })
    });
}

fn rewrite_bodies(c: &mut Criterion) {
    let mut g = c.benchmark_group("rewrite_stream_options");
    for size in [1024usize, 100 * 1024] {
        let filler = "lorem ipsum dolor sit amet ".repeat(size / 27);
        let body = serde_json::json!({
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": filler}],
            "max_tokens": 256, "temperature": 0.7, "stream": true,
        })
        .to_string()
        .into_bytes();
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(body.len()), &body, |b, body| {
            b.iter(|| {
                let info = rewrite::inspect(black_box(body), true).unwrap();
                black_box(rewrite::rewrite(body, &info, UsageMode::Final))
            })
        });
    }
    g.finish();
}

fn heads_and_records(c: &mut Criterion) {
    let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: llm.example.com\r\nUser-Agent: OpenAI/Python 1.54.0\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-proj-abcdefghijklmnop9f2a\r\nX-Stainless-Lang: python\r\nContent-Length: 187\r\n\r\n";
    c.bench_function("request_head_parse", |b| {
        let mut h = RequestHead::default();
        b.iter(|| black_box(h.parse(black_box(raw), 64 * 1024).unwrap()))
    });
    let rec = sample_record();
    c.bench_function("record_serialize", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            rec.write_json(&mut out);
            black_box(out.len())
        })
    });
}

/// A streamed chat request's record, as the proxy makes it.
fn sample_record() -> UsageRecord {
    UsageRecord {
        request_id: "req_0192f3c4a1b27c3d9e8f0a1b2c3d4e5f".into(),
        client_request_id: None,
        user_id: "user_alice".into(),
        api_key: "sk-pro...9f2a".into(),
        model: "meta-llama/Llama-3-8b-Instruct".into(),
        usage: {
            let mut u = Usage::default();
            u.parse_into(
                br#"{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57,"prompt_tokens_details":{"cached_tokens":8}}"#,
            );
            u
        },
        is_stream: true,
        endpoint: "/v1/chat/completions".into(),
        timestamp: std::time::SystemTime::now(),
        backend_url: "http://vllm:8000".into(),
        status_code: 200,
        outcome: Outcome::Completed,
        usage_source: UsageSource::Backend,
        duration_ms: 1834,
        ttft_ms: Some(41),
    }
}

/// Records per round in the billing benches: a sender round at saturation (the
/// default `usage_hook.pipeline`).
const ROUND: usize = 128;

/// Billing's stages, each per record (the figures are per round of `ROUND`; divide),
/// in the order a record goes through them: serialized on the worker and pushed to its
/// staging ring; taken from the ring by the spool writer (or, in place, by the sender
/// while the webhook keeps up: 2b); written to the segment and
/// read back by the sender (cursor saved once per round); POSTed, pipelined, to a
/// webhook on loopback (a thread of this process that answers 200: its work is in the
/// wall time). Issue 22, goal 1: where billing's ~1 us a record goes.
fn billing(c: &mut Criterion) {
    use llmproxy::delivery::spool::{Next, Spool};
    use llmproxy::delivery::webhook::PlainHttp;
    let rec = sample_record();
    let mut line = Vec::new();
    rec.write_json(&mut line);
    line.push(b'\n');
    let dir = std::env::temp_dir().join(format!("llmproxy-bench-spool-{}", std::process::id()));
    let spool = Spool::open(&dir).expect("a spool in the temp dir");
    let mut g = c.benchmark_group("billing_per_record");
    g.throughput(Throughput::Elements(ROUND as u64));
    g.bench_function("1_serialize_and_push_to_ring", |b| {
        let rings = spool.rings();
        let ring = rings.add().expect("a staging ring");
        let mut one = Vec::with_capacity(1024);
        let mut taken = Vec::with_capacity(ROUND * line.len());
        b.iter(|| {
            for _ in 0..ROUND {
                one.clear();
                rec.write_json(&mut one);
                one.push(b'\n');
                black_box(ring.push(&one));
            }
            // Room for the next round (the writer's side, measured below).
            taken.clear();
            rings.take(&mut taken);
            rings.release();
        })
    });
    g.bench_function("2_take_from_ring", |b| {
        let rings = spool.rings();
        let ring = rings.add().expect("a staging ring");
        let mut taken = Vec::with_capacity(ROUND * line.len());
        // Only the take is timed; the pushes that fill the ring are not.
        b.iter_custom(|iters| {
            timed_after(
                iters,
                || (0..ROUND).for_each(|_| _ = black_box(ring.push(&line))),
                || {
                    taken.clear();
                    black_box(rings.take(&mut taken));
                    rings.release();
                },
            )
        })
    });
    g.bench_function("2b_sender_take_in_place", |b| {
        // The sender's take while the webhook keeps up: the records split where the
        // worker wrote them (no copy), then settled.
        let rings = spool.rings();
        let ring = rings.add().expect("a staging ring");
        let mut take = llmproxy::delivery::SenderTake::default();
        b.iter_custom(|iters| {
            timed_after(
                iters,
                || (0..ROUND).for_each(|_| _ = black_box(ring.push(&line))),
                || {
                    black_box(rings.take_for_sender(&mut take));
                    let n = take.len();
                    rings.settle(&mut take, n, false);
                },
            )
        })
    });
    let mut writer = spool.writer().expect("a segment");
    let mut reader = spool.reader();
    g.bench_function("3_write_segment_and_read_back", |b| {
        let lines = line.repeat(ROUND);
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(ROUND);
        b.iter(|| {
            writer.append_lines(&lines);
            writer.write_out(false).expect("a segment write");
            reader.recycle(&mut out);
            while let Next::Record(l) = reader.next(std::time::Duration::ZERO) {
                out.push(l);
                if out.len() == ROUND {
                    break;
                }
            }
            for _ in 0..out.len() {
                reader.ack();
            }
            reader.save();
            black_box(out.len())
        })
    });
    g.bench_function("4_post_pipelined_to_loopback_webhook", |b| {
        let port = loopback_webhook();
        let url =
            llmproxy::url::Url::parse(&format!("http://127.0.0.1:{port}/usage")).expect("a url");
        let mut hook = PlainHttp::new(&url, &[], None, std::time::Duration::from_secs(5))
            .expect("a plain http webhook");
        let body = &line[..line.len() - 1];
        let items: Vec<(&[u8], &str)> = (0..ROUND)
            .map(|_| (body, "req_0192f3c4a1b27c3d9e8f0a1b2c3d4e5f"))
            .collect();
        b.iter(|| {
            let answers = hook.post_many(&items);
            assert!(answers.iter().all(|a| matches!(a, Ok((200, _)))));
        })
    });
    g.finish();
    drop((writer, reader, spool));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Times `timed` alone, `iters` times, each after an untimed `untimed`.
fn timed_after(
    iters: u64,
    mut untimed: impl FnMut(),
    mut timed: impl FnMut(),
) -> std::time::Duration {
    let mut spent = std::time::Duration::ZERO;
    for _ in 0..iters {
        untimed();
        let at = std::time::Instant::now();
        timed();
        spent += at.elapsed();
    }
    spent
}

/// A webhook on loopback for the billing bench: answers every POST with 200 and an
/// empty body, as fast as it can. Returns its port.
fn loopback_webhook() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let port = l.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        while let Ok((mut s, _)) = l.accept() {
            let mut buf = vec![0u8; 256 * 1024];
            let (mut start, mut end) = (0, 0);
            let mut answers = Vec::new();
            loop {
                // Every whole request in the buffer gets its answer, in one write.
                loop {
                    let mut headers = [httparse::EMPTY_HEADER; 16];
                    let mut req = httparse::Request::new(&mut headers);
                    let Ok(httparse::Status::Complete(n)) = req.parse(&buf[start..end]) else {
                        break;
                    };
                    let len: usize = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                        .unwrap_or(0);
                    if end - start < n + len {
                        break;
                    }
                    start += n + len;
                    answers.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
                if !answers.is_empty() {
                    if s.write_all(&answers).is_err() {
                        break;
                    }
                    answers.clear();
                }
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                match s.read(&mut buf[end..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => end += n,
                }
            }
        }
    });
    port
}

/// What the worker counts for one proxied JSON request, as `conn.rs` does.
fn count_one(w: &WorkerMetrics, slot: usize, i: u64) {
    w.request_started();
    w.backend_started(slot);
    w.backend_done(slot);
    w.count_request(0, false, Some(slot), 200);
    w.latency_us(1_000 + (i & 1023));
    w.overhead_us(20 + (i & 31));
    w.record(15, 42 + (i & 1));
    w.request_done();
}

fn metrics(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics_per_request");
    g.bench_function("one_worker", |b| {
        let m = Arc::new(Metrics::new(1));
        let slot = m.slot("vllm");
        let w = m.claim(0).expect("shard");
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            count_one(&w, slot, black_box(i));
        })
    });
    // Two workers on two threads (cores here), each in its own shard: the time per
    // request on each.
    g.bench_function("two_workers", |b| {
        b.iter_custom(|n| {
            let m = Arc::new(Metrics::new(2));
            let slot = m.slot("vllm");
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for k in 0..2 {
                    let m = m.clone();
                    s.spawn(move || {
                        let Some(w) = m.claim(k) else { return };
                        for i in 0..n {
                            count_one(&w, slot, black_box(i));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    // For reference, the design the shards replaced: the same eleven adds as locked
    // read-modify-writes on counters both workers share.
    g.bench_function("two_workers_shared_counters_reference", |b| {
        b.iter_custom(|n| {
            let shared: [AtomicU64; 11] = Default::default();
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let shared = &shared;
                    s.spawn(move || {
                        for i in 0..n {
                            for c in shared {
                                c.fetch_add(black_box(i) & 1, Relaxed);
                            }
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

/// Per-key limits: a request's admission and charge (goal: under 1 us), the key lookup
/// in a 10,000-key config, and loading and reloading that config's keys (a reload
/// keeps the counters of the keys that stay).
fn limits(c: &mut Criterion) {
    use llmproxy::auth::Auth;
    use llmproxy::config::{AuthConfig, Budget, BudgetPeriod, KeyConfig, LimitsConfig};
    use llmproxy::limits::{Clock, Counters};
    let limits = LimitsConfig {
        rpm: Some(u64::MAX >> 30),
        tpm: Some(u64::MAX >> 30),
        max_concurrent: Some(1_000_000),
        budget: Some(Budget {
            tokens: u64::MAX >> 30,
            period: BudgetPeriod::Month,
        }),
    };
    let counters = Counters::default();
    let clock = Clock::at(std::time::SystemTime::now());
    c.bench_function("limits/admit_and_charge_all_four", |b| {
        b.iter(|| {
            let (permit, standing) = counters.admit(black_box(&limits), &clock, false);
            black_box(&standing);
            drop(black_box(permit));
            counters.charge(&limits, &clock, black_box(271));
        })
    });
    c.bench_function("limits/clock_read", |b| {
        b.iter(|| black_box(Clock::at(std::time::SystemTime::now())))
    });
    let cfg = AuthConfig {
        enabled: true,
        keys: (0..10_000)
            .map(|i| KeyConfig {
                key: format!("sk-customer-{i:08}-0123456789abcdef"),
                user_id: format!("user-{i}"),
                rpm: Some(60),
                tpm: Some(100_000),
                max_concurrent: Some(4),
                budget: None,
            })
            .collect(),
        default_limits: limits,
    };
    let auth = Auth::new(&cfg, None);
    c.bench_function("limits/key_lookup_in_10k", |b| {
        b.iter(|| black_box(auth.key(Some(black_box("sk-customer-00004711-0123456789abcdef")))))
    });
    let mut g = c.benchmark_group("limits/10k_keys");
    g.sample_size(20);
    g.bench_function("load", |b| b.iter(|| black_box(Auth::new(&cfg, None))));
    g.bench_function("reload_keeping_counters", |b| {
        b.iter(|| black_box(Auth::new(&cfg, Some(&auth))))
    });
    g.finish();
    sync_with_redis(c, &cfg, &clock);
}

/// One sync of the limits store with all 10,000 keys in use (rpm, tpm and a budget
/// each: 30,000 counts) against a real redis-server on loopback, started here (Debian's
/// package; skipped when it is not installed). This is the limits-sync thread's work
/// per interval, Redis's share included: it bounds how short `limits_sync_interval`
/// can be for that many active keys.
fn sync_with_redis(
    c: &mut Criterion,
    cfg: &llmproxy::config::AuthConfig,
    clock: &llmproxy::limits::Clock,
) {
    use llmproxy::auth::Auth;
    use llmproxy::limits::store::Syncer;
    const SERVER: &str = "/usr/bin/redis-server";
    if !std::path::Path::new(SERVER).exists() {
        eprintln!("limits/sync: skipped (redis-server is not installed)");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let dir = std::env::temp_dir().join(format!("llmproxy-bench-redis-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut server = std::process::Command::new(SERVER)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start redis-server");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let auth = Arc::new(Auth::new(cfg, None));
    for (_, key) in auth.keys() {
        let (permit, _) = key.counters.admit(&key.limits, clock, false);
        drop(permit);
        key.counters.charge(&key.limits, clock, 271);
    }
    let config = llmproxy::config::Config::from_yaml(&format!(
        "backends:\n  - url: \"http://127.0.0.1:1\"\nlimits_store: \"redis://127.0.0.1:{port}/0\"\n"
    ))
    .expect("config");
    let source = auth.clone();
    let metrics = Arc::new(Metrics::new(1));
    let mut syncer =
        Syncer::new(&config, Box::new(move || source.clone()), metrics.clone()).expect("syncer");
    let mut g = c.benchmark_group("limits/sync_redis_10k_keys_30k_counts");
    g.sample_size(10);
    // Every key served a request since the last sync: each count is written and read.
    g.bench_function("all_changed", |b| {
        b.iter(|| {
            for (_, key) in auth.keys() {
                drop(key.counters.admit(&key.limits, clock, false).0);
                key.counters.charge(&key.limits, clock, 271);
            }
            syncer.tick()
        })
    });
    // Keys in use but idle since the last sync: each count is only read.
    g.bench_function("unchanged", |b| b.iter(|| syncer.tick()));
    g.finish();
    assert_eq!(
        metrics.limits_sync_failures.load(Relaxed),
        0,
        "syncs failed"
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    sse,
    relay_body,
    usage_json,
    rewrite_bodies,
    heads_and_records,
    billing,
    metrics,
    limits
);
criterion_main!(benches);
