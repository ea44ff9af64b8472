//! A mock vLLM: an OpenAI-compatible server with deterministic token counts, in the
//! exact wire shapes vLLM uses (read from vLLM's own entrypoints; the route
//! table in docs/billing.md says which shape each path has). Used by the README demo,
//! the integration tests and the benchmarks.
//!
//!     cargo run --example mock_vllm -- --port 8000 [--models a,b] [--tokens 16]
//!         [--token-delay-ms 0] [--prefill-ms 0] [--name backend-a]
//!
//! Prompt tokens are the whitespace-separated words of the prompt (at least 1);
//! completion tokens are `max_tokens`, else `--tokens`. Per-request knobs, as headers:
//!   x-mock-tokens: N             completion tokens
//!   x-mock-token-delay-ms: N     pause between streamed tokens
//!   x-mock-prefill-ms: N         pause before the first output (a stream's head goes
//!                                at once, as vLLM's does; a whole answer waits)
//!   x-mock-pause-after-first-ms: N  pause after the first content chunk
//!   x-mock-split: N              write the stream in pieces of N bytes
//!   x-mock-fail: status-500 | error-event | reset | hang
//!   x-mock-flavor: llamacpp      answer as llama.cpp's llama-server does (also
//!                                `--flavor llamacpp`): `timings` on the last event
//!                                (per event with `timings_per_token`), completions'
//!                                usage on the last event that has choices, no
//!                                `continuous_usage_stats`, `: ping` comments, and an
//!                                Ollama-style `models` list beside `data`
//! `GET /mock/last` returns the last request received (headers and body) as JSON.
//!
//! `--prerender` (for benchmarks): chat completions are answered from responses built
//! at start (`--tokens` chunks, usage chunk when the request asks for it), by one
//! io_uring event loop for all connections (answers to pipelined requests in one write),
//! so the mock costs as little CPU as possible and is not what is measured. Only
//! chat completions, `/v1/models` and `/health` are served in this mode.
//!
//! `--paced` (for benchmarks): chat streams with a token delay are fed by one pacer
//! thread for all of them (non-blocking writes, 2 ms ticks) instead of a sleeping
//! thread each, so 10,000 slow streams at once cost the mock little.

#[path = "common/http.rs"]
mod http;

use serde_json::{Value, json};
use std::io::Write;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

struct Mock {
    models: Vec<String>,
    tokens: u64,
    token_delay: u64,
    /// Pause before the first output, like a real engine's prefill.
    prefill: u64,
    /// Answer as llama.cpp's llama-server (see `x-mock-flavor`).
    llamacpp: bool,
    name: String,
    last: Mutex<Value>,
    prerendered: Option<Prerendered>,
    paced: bool,
}

/// Whole responses built once: JSON, SSE without and with the usage chunk, and the
/// answers to the health checks a proxy sends.
struct Prerendered {
    json: Vec<u8>,
    sse: Vec<u8>,
    sse_usage: Vec<u8>,
    health: Vec<u8>,
    models: Vec<u8>,
    not_found: Vec<u8>,
}

impl Prerendered {
    /// The whole response to a chat completion with this body.
    fn chat(&self, body: &[u8]) -> &[u8] {
        let has = |needle: &[u8]| memchr::memmem::find(body, needle).is_some();
        if !has(b"\"stream\":true") {
            &self.json
        } else if has(b"\"include_usage\":true") {
            &self.sse_usage
        } else {
            &self.sse
        }
    }
}

/// The prerender mode's server: one io_uring event loop (monoio) on one thread for all
/// connections, every request answered from prerendered bytes, answers to the requests
/// of one read gathered in one write. The thread-per-connection server costs ~10 us of
/// the load generator's core per request (two context switches each); this one does
/// not make the backend what a benchmark measures.
mod fast {
    use super::{Mock, Prerendered};
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    use monoio::net::{TcpListener, TcpStream};
    use std::rc::Rc;

    pub fn serve(listener: std::net::TcpListener, mock: Mock) {
        let Some(pre) = mock.prerendered else { return };
        let pre = Rc::new(pre);
        let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(1024)
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("mock-vllm: cannot start the event loop: {e}");
                std::process::exit(1);
            }
        };
        rt.block_on(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("mock-vllm: cannot use the listener: {e}");
                    std::process::exit(1);
                }
            };
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                monoio::spawn(connection(stream, pre.clone()));
            }
        });
    }

    /// A whole request at the start of a buffer: where it ends, whether it asks to
    /// close, its route and its body.
    struct Parsed {
        end: usize,
        close: bool,
        chat: bool,
        models: bool,
        health: bool,
        body: std::ops::Range<usize>,
    }

    /// The request at the start of `buf`: `None` while incomplete, `Err` when it is not
    /// HTTP.
    fn parse(buf: &[u8]) -> Result<Option<Parsed>, ()> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let head = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(()),
        };
        let route = req.path.unwrap_or("").split('?').next().unwrap_or("");
        let mut len = 0usize;
        let mut chunked = false;
        let mut close = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                len = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or(())?;
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h.value.eq_ignore_ascii_case(b"chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = h.value.eq_ignore_ascii_case(b"close");
            }
        }
        let (body, end) = if chunked {
            // Chunk sizes are skipped over; the routing needs only a whole body's
            // bytes, and a chunked body is matched chunk by chunk.
            let mut at = head;
            loop {
                let Some(nl) = memchr::memchr(b'\n', &buf[at..]) else {
                    return Ok(None);
                };
                let line = std::str::from_utf8(&buf[at..at + nl]).map_err(|_| ())?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| ())?;
                at += nl + 1 + size + 2;
                if at > buf.len() {
                    return Ok(None);
                }
                if size == 0 {
                    break;
                }
            }
            (head..at, at)
        } else {
            if buf.len() < head + len {
                return Ok(None);
            }
            (head..head + len, head + len)
        };
        Ok(Some(Parsed {
            end,
            close,
            chat: route == "/v1/chat/completions",
            models: route == "/v1/models",
            health: route == "/health",
            body,
        }))
    }

    async fn connection(mut stream: TcpStream, pre: Rc<Prerendered>) {
        let mut inb: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            if inb.len() == inb.capacity() {
                inb.reserve(inb.capacity());
            }
            let (res, buf) = stream.read(inb).await;
            inb = buf;
            match res {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let mut at = 0;
            let mut close = false;
            while !close {
                let p = match parse(&inb[at..]) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(()) => return,
                };
                let whole = if p.chat {
                    pre.chat(&inb[at + p.body.start..at + p.body.end])
                } else if p.models {
                    &pre.models
                } else if p.health {
                    &pre.health
                } else {
                    &pre.not_found
                };
                out.extend_from_slice(whole);
                at += p.end;
                close = p.close;
            }
            inb.drain(..at);
            if !out.is_empty() {
                let (res, buf) = stream.write_all(out).await;
                out = buf;
                out.clear();
                if res.is_err() {
                    return;
                }
            }
            if close {
                return;
            }
        }
    }
}

fn main() {
    let port: u16 = http::flag("--port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let host = http::flag("--host").unwrap_or_else(|| "127.0.0.1".into());
    let mock = Mock {
        models: http::flag("--models")
            .unwrap_or_else(|| "mock-model".into())
            .split(',')
            .map(str::to_owned)
            .collect(),
        tokens: http::flag("--tokens")
            .and_then(|t| t.parse().ok())
            .unwrap_or(16),
        token_delay: http::flag("--token-delay-ms")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
        prefill: http::flag("--prefill-ms")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
        llamacpp: http::flag("--flavor").as_deref() == Some("llamacpp"),
        name: http::flag("--name").unwrap_or_else(|| format!("mock-{port}")),
        last: Mutex::new(Value::Null),
        prerendered: None,
        paced: std::env::args().any(|a| a == "--paced"),
    };
    let mock = Mock {
        prerendered: std::env::args()
            .any(|a| a == "--prerender")
            .then(|| prerender(&mock.models, &mock.name, mock.tokens)),
        ..mock
    };
    let listener = http::listen("mock-vllm", &host, port);
    if mock.prerendered.is_some() {
        return fast::serve(listener, mock);
    }
    let mock = std::sync::Arc::new(mock);
    http::serve(listener, move |req, w| mock.handle(req, w));
}

fn error_json(status: u16, msg: &str) -> Vec<u8> {
    json!({"object": "error", "message": msg, "type": "BadRequestError", "param": null, "code": status})
        .to_string()
        .into_bytes()
}

fn words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(a) => a.iter().map(words).sum(),
        Value::Object(o) => o.get("content").or_else(|| o.get("text")).map_or(0, words),
        _ => 0,
    }
}

fn prerender(models: &[String], name: &str, tokens: u64) -> Prerendered {
    let model = models[0].as_str();
    let usage =
        json!({"prompt_tokens": 5, "total_tokens": 5 + tokens, "completion_tokens": tokens});
    let text: String = (0..tokens).map(|i| format!("tok{i} ")).collect();
    let body = json!({
        "id": "cmpl-mock", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": usage,
    })
    .to_string();
    let json = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let sse = |with_usage: bool| {
        let mut events = Vec::new();
        for i in 0..tokens {
            events.push(json!({"id": "cmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "logprobs": null, "finish_reason": null}]}).to_string());
        }
        if with_usage {
            events.push(json!({"id": "cmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage}).to_string());
        }
        events.push("[DONE]".into());
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for e in events {
            let ev = format!("data: {e}\n\n");
            out.extend_from_slice(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes());
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    };
    let answer = |status: u16, body: &[u8]| {
        let mut out = Vec::new();
        http::respond_into(&mut out, status, "application/json", body);
        out
    };
    let data: Vec<Value> = models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": name}))
        .collect();
    let models = json!({"object": "list", "data": data});
    Prerendered {
        json,
        sse: sse(false),
        sse_usage: sse(true),
        health: answer(200, b"{}"),
        models: answer(200, models.to_string().as_bytes()),
        not_found: answer(404, &error_json(404, "not found")),
    }
}

impl Mock {
    fn handle(&self, req: &http::Request, w: &mut TcpStream) -> std::io::Result<bool> {
        let route = req.path.split('?').next().unwrap_or("");
        if route != "/mock/last" && route != "/health" {
            let headers: serde_json::Map<String, Value> = req
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v.clone())))
                .collect();
            if let Ok(mut last) = self.last.lock() {
                *last = json!({
                    "method": req.method, "path": req.path, "headers": headers,
                    "body": String::from_utf8_lossy(&req.body),
                });
            }
        }
        match (req.method.as_str(), route) {
            ("GET", "/health") => http::respond(w, 200, "application/json", b"{}"),
            ("GET", "/mock/last") => {
                let last = self.last.lock().map(|l| l.to_string()).unwrap_or_default();
                http::respond(w, 200, "application/json", last.as_bytes())
            }
            ("GET", "/v1/models") => {
                let data: Vec<Value> = self
                    .models
                    .iter()
                    .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": self.name}))
                    .collect();
                let mut list = json!({"object": "list", "data": data});
                if self.llamacpp || req.header("x-mock-flavor") == Some("llamacpp") {
                    list["models"] = json!(
                        self.models
                            .iter()
                            .map(|m| json!({"name": m, "model": m, "type": "model"}))
                            .collect::<Vec<_>>()
                    );
                }
                http::respond(w, 200, "application/json", list.to_string().as_bytes())
            }
            ("POST", "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings") => {
                self.generate(req, route, w)
            }
            ("POST", "/v1/responses" | "/v1/messages") => self.typed_stream_api(req, route, w),
            (
                "POST",
                "/rerank" | "/v1/rerank" | "/v2/rerank" | "/score" | "/v1/score" | "/pooling"
                | "/classify" | "/v2/embed",
            ) => self.pooling(req, route, w),
            ("POST", "/v1/audio/transcriptions" | "/v1/audio/translations") => self.audio(req, w),
            ("POST", "/v1/messages/count_tokens" | "/tokenize") => {
                let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
                let n = words(&body["messages"]) + words(&body["prompt"]);
                let resp = if route == "/tokenize" {
                    json!({"count": n, "max_model_len": 4096, "tokens": (0..n).collect::<Vec<u64>>()})
                } else {
                    json!({"input_tokens": n})
                };
                http::respond(w, 200, "application/json", resp.to_string().as_bytes())
            }
            ("POST", "/detokenize") => {
                http::respond(w, 200, "application/json", br#"{"prompt":"tok0 tok1"}"#)
            }
            ("GET", r) if r.starts_with("/v1/responses/") => {
                let id = &r["/v1/responses/".len()..];
                let resp = json!({"id": id, "object": "response", "created_at": 0, "model": self.models[0], "status": "completed", "output": [], "usage": null});
                http::respond(w, 200, "application/json", resp.to_string().as_bytes())
            }
            ("POST", r) if r.starts_with("/v1/responses/") && r.ends_with("/cancel") => {
                let id = &r["/v1/responses/".len()..r.len() - "/cancel".len()];
                let resp = json!({"id": id, "object": "response", "created_at": 0, "model": self.models[0], "status": "cancelled", "output": [], "usage": null});
                http::respond(w, 200, "application/json", resp.to_string().as_bytes())
            }
            _ => http::respond(w, 404, "application/json", &error_json(404, "not found")),
        }
    }

    fn generate(
        &self,
        req: &http::Request,
        route: &str,
        w: &mut TcpStream,
    ) -> std::io::Result<bool> {
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(e) => {
                return http::respond(w, 400, "application/json", &error_json(400, &e.to_string()));
            }
        };
        let model = body["model"].as_str().unwrap_or_default().to_string();
        if !self.models.contains(&model) {
            return http::respond(
                w,
                404,
                "application/json",
                &error_json(404, &format!("The model `{model}` does not exist.")),
            );
        }
        let stream = body["stream"].as_bool() == Some(true);
        // vLLM's own rule: stream_options is only allowed with stream=true.
        if !body["stream_options"].is_null() && !stream {
            return http::respond(
                w,
                400,
                "application/json",
                &error_json(
                    400,
                    "Stream options can only be defined when `stream=True`.",
                ),
            );
        }
        let fail = req.header("x-mock-fail").unwrap_or("");
        match fail {
            "status-500" => {
                return http::respond(w, 500, "application/json", &error_json(500, "mock failure"));
            }
            "hang" => {
                std::thread::sleep(Duration::from_secs(3600));
                return Ok(false);
            }
            _ => {}
        }
        let num = |h: &str| req.header(h).and_then(|v| v.parse::<u64>().ok());
        let prompt_tokens = match route {
            "/v1/chat/completions" => words(&body["messages"]),
            "/v1/completions" => words(&body["prompt"]),
            _ => words(&body["input"]),
        }
        .max(1);
        if route == "/v1/embeddings" {
            let dim = num("x-mock-embedding-dim").unwrap_or(8) as usize;
            let emb: Vec<f64> = (0..dim).map(|i| (i as f64 * 0.001).sin()).collect();
            let resp = json!({
                "id": "embd-mock", "object": "list", "created": 0, "model": model,
                "data": [{"index": 0, "object": "embedding", "embedding": emb}],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0}
            });
            return http::respond(w, 200, "application/json", resp.to_string().as_bytes());
        }
        let completion = num("x-mock-tokens")
            .or(body["max_tokens"].as_u64())
            .or(body["max_completion_tokens"].as_u64())
            .unwrap_or(self.tokens);
        let chat = route == "/v1/chat/completions";
        let usage = |c: u64| json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + c, "completion_tokens": c});
        let text: String = (0..completion).map(|i| format!("tok{i} ")).collect();
        let prefill = Duration::from_millis(num("x-mock-prefill-ms").unwrap_or(self.prefill));
        if !stream {
            std::thread::sleep(prefill);
            let choice = if chat {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
            } else {
                json!({"index": 0, "text": text, "finish_reason": "length"})
            };
            let resp = json!({
                "id": "cmpl-mock", "object": if chat { "chat.completion" } else { "text_completion" },
                "created": 0, "model": model, "choices": [choice], "usage": usage(completion)
            });
            return http::respond(w, 200, "application/json", resp.to_string().as_bytes());
        }

        let llama = self.llamacpp || req.header("x-mock-flavor") == Some("llamacpp");
        let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
        // llama.cpp ignores continuous_usage_stats; it has per-event timings instead.
        let continuous =
            !llama && body["stream_options"]["continuous_usage_stats"].as_bool() == Some(true);
        let per_token_timings = llama && body["timings_per_token"].as_bool() == Some(true);
        let timings = |n: u64| json!({"cache_n": 0, "prompt_n": prompt_tokens, "prompt_ms": 1.25, "predicted_n": n, "predicted_ms": 0.5 * n as f64});
        let delay = num("x-mock-token-delay-ms").unwrap_or(self.token_delay);
        let pause_after_first = num("x-mock-pause-after-first-ms").unwrap_or(0);
        let split = num("x-mock-split").unwrap_or(0) as usize;
        let paced = self.paced
            && !llama
            && chat
            && delay > 0
            && pause_after_first == 0
            && split == 0
            && fail.is_empty();
        // The pacer closes a connection after its stream, so it says so: a proxy must
        // not reuse it (nginx answered 502 when it did).
        w.write_all(if paced {
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".as_slice()
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n".as_slice()
        })?;
        if paced {
            let stream = w.try_clone()?;
            stream.set_nonblocking(true)?;
            let paced = Paced {
                w: stream,
                pending: Vec::new(),
                next: 0,
                total: completion,
                every: Duration::from_millis(delay),
                due: std::time::Instant::now() + prefill,
                model: serde_json::to_string(&model).unwrap_or_default(),
                prompt_tokens,
                include_usage,
                continuous,
            };
            let _ = pacer().send(paced);
            // The pacer owns the connection now; it closes it after the stream.
            return Ok(false);
        }
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut sse = SseWriter { w, split };
        std::thread::sleep(prefill);
        let chunk = |choice: Value, c: u64| {
            let mut v = json!({"id": "cmpl-mock", "object": object, "created": 0, "model": model, "choices": [choice]});
            if continuous {
                v["usage"] = usage(c);
            }
            if per_token_timings {
                v["timings"] = timings(c);
            }
            v.to_string()
        };
        if chat {
            sse.event(&chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}), 0))?;
        }
        for i in 0..completion {
            if fail == "reset" && i == 2 {
                // Die mid-stream: no last chunk, no [DONE].
                let _ = sse.w.flush();
                let _ = sse.w.shutdown(std::net::Shutdown::Both);
                return Ok(false);
            }
            if fail == "error-event" && i == 1 {
                sse.event(&json!({"error": {"message": "mock engine failure", "type": "InternalServerError", "param": null, "code": 500}}).to_string())?;
                sse.event("[DONE]")?;
                sse.w.write_all(b"0\r\n\r\n")?;
                return Ok(true);
            }
            let tok = format!("tok{i} ");
            let choice = if chat {
                json!({"index": 0, "delta": {"content": tok}, "logprobs": null, "finish_reason": null})
            } else {
                json!({"index": 0, "text": tok, "logprobs": null, "finish_reason": null})
            };
            sse.event(&chunk(choice, i + 1))?;
            if llama && i == 0 {
                sse.raw(": ping\n\n")?;
            }
            if i == 0 && pause_after_first > 0 {
                std::thread::sleep(Duration::from_millis(pause_after_first));
            } else if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
        }
        let last = if chat {
            json!({"index": 0, "delta": {"content": ""}, "logprobs": null, "finish_reason": "length", "stop_reason": null})
        } else {
            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": "length", "stop_reason": null})
        };
        if llama {
            // llama-server: completions put the usage on the last event, which still
            // has choices; chat adds a usage-only chunk. `timings` go on the very last.
            let mut events = vec![
                json!({"id": "cmpl-mock", "object": object, "created": 0, "model": model, "choices": [last], "system_fingerprint": "b1-mock"}),
            ];
            if include_usage && chat {
                events.push(json!({"id": "cmpl-mock", "object": object, "created": 0, "model": model, "choices": [], "system_fingerprint": "b1-mock", "usage": usage(completion)}));
            } else if include_usage {
                events[0]["usage"] = usage(completion);
            }
            if let Some(e) = events.last_mut() {
                e["timings"] = timings(completion);
            }
            for e in events {
                sse.event(&e.to_string())?;
            }
        } else {
            sse.event(&chunk(last, completion))?;
            if include_usage {
                let v = json!({"id": "cmpl-mock", "object": object, "created": 0, "model": model, "choices": [], "usage": usage(completion)});
                sse.event(&v.to_string())?;
            }
        }
        sse.event("[DONE]")?;
        sse.w.write_all(b"0\r\n\r\n")?;
        Ok(true)
    }
}

impl Mock {
    /// The JSON body of a request, or the 400 already answered.
    fn json_body(&self, req: &http::Request, w: &mut TcpStream) -> Option<Value> {
        match serde_json::from_slice::<Value>(&req.body) {
            Ok(v) if self.models.iter().any(|m| v["model"] == m.as_str()) => Some(v),
            Ok(v) => {
                let msg = format!("The model `{}` does not exist.", v["model"]);
                let _ = http::respond(w, 404, "application/json", &error_json(404, &msg));
                None
            }
            Err(e) => {
                let _ = http::respond(w, 400, "application/json", &error_json(400, &e.to_string()));
                None
            }
        }
    }

    /// vLLM's pooling-family APIs: rerank (`{prompt_tokens, total_tokens}`), score,
    /// pooling, classify (`UsageInfo`), and Cohere's `/v2/embed` (`meta.billed_units`).
    fn pooling(
        &self,
        req: &http::Request,
        route: &str,
        w: &mut TcpStream,
    ) -> std::io::Result<bool> {
        let Some(body) = self.json_body(req, w) else {
            return Ok(true);
        };
        let model = body["model"].clone();
        let n = (words(&body["query"])
            + words(&body["documents"])
            + words(&body["text_1"])
            + words(&body["text_2"])
            + words(&body["input"])
            + words(&body["texts"]))
        .max(1);
        let resp = match route {
            "/rerank" | "/v1/rerank" | "/v2/rerank" => json!({
                "id": "rerank-mock", "model": model,
                "usage": {"prompt_tokens": n, "total_tokens": n},
                "results": [{"index": 0, "document": {"text": "d"}, "relevance_score": 0.9}]
            }),
            "/score" | "/v1/score" => json!({
                "id": "score-mock", "object": "list", "created": 0, "model": model,
                "data": [{"index": 0, "object": "score", "score": 0.5}],
                "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": null}
            }),
            "/v2/embed" => json!({
                "id": "embd-mock", "embeddings": {"float": [[0.1, 0.2]]}, "texts": [],
                "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": n}}
            }),
            _ => json!({
                "id": "pool-mock", "object": "list", "created": 0, "model": model,
                "data": [{"index": 0, "object": "pooling", "data": [0.1, 0.2]}],
                "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": null}
            }),
        };
        http::respond(w, 200, "application/json", resp.to_string().as_bytes())
    }

    /// OpenAI Responses and Anthropic Messages, in vLLM's shapes: named events
    /// (`event:` lines); Responses has no `[DONE]`, Messages ends with one; Messages
    /// reports input in `message_start` and the cumulative usage in `message_delta`.
    fn typed_stream_api(
        &self,
        req: &http::Request,
        route: &str,
        w: &mut TcpStream,
    ) -> std::io::Result<bool> {
        let Some(body) = self.json_body(req, w) else {
            return Ok(true);
        };
        let model = body["model"].as_str().unwrap_or_default().to_string();
        let num = |h: &str| req.header(h).and_then(|v| v.parse::<u64>().ok());
        let responses = route == "/v1/responses";
        let prompt = if responses {
            words(&body["input"]) + words(&body["instructions"])
        } else {
            words(&body["messages"]) + words(&body["system"])
        }
        .max(1);
        let completion = num("x-mock-tokens")
            .or(body["max_output_tokens"].as_u64())
            .or(body["max_tokens"].as_u64())
            .unwrap_or(self.tokens);
        let text: String = (0..completion).map(|i| format!("tok{i} ")).collect();
        let responses_usage = |c: u64| json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": c, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + c});
        let response = |status: &str, c: u64, text: &str, usage: Value| {
            json!({
                "id": "resp_mock", "object": "response", "created_at": 0, "model": model,
                "status": status, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
                "output": [{"type": "message", "id": "msg_mock", "role": "assistant", "status": status,
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": usage, "max_output_tokens": c,
            })
        };
        let message = |text: &str, usage: Value| {
            json!({
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens", "stop_sequence": null, "usage": usage,
            })
        };
        if body["stream"].as_bool() != Some(true) {
            let resp = if responses {
                response("completed", completion, &text, responses_usage(completion))
            } else {
                message(
                    &text,
                    json!({"input_tokens": prompt, "output_tokens": completion, "cache_read_input_tokens": 0}),
                )
            };
            return http::respond(w, 200, "application/json", resp.to_string().as_bytes());
        }
        let delay = num("x-mock-token-delay-ms").unwrap_or(self.token_delay);
        let fail = req.header("x-mock-fail").unwrap_or("");
        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")?;
        let mut sse = SseWriter {
            w,
            split: num("x-mock-split").unwrap_or(0) as usize,
        };
        let mut seq = 0u64;
        let mut named = |sse: &mut SseWriter<'_>, kind: &str, mut v: Value| {
            v["type"] = json!(kind);
            if responses {
                v["sequence_number"] = json!(seq);
                seq += 1;
            }
            sse.named(kind, &v.to_string())
        };
        if responses {
            named(
                &mut sse,
                "response.created",
                json!({"response": response("in_progress", completion, "", Value::Null)}),
            )?;
            named(
                &mut sse,
                "response.in_progress",
                json!({"response": response("in_progress", completion, "", Value::Null)}),
            )?;
            named(
                &mut sse,
                "response.output_item.added",
                json!({"output_index": 0, "item": {"type": "message", "id": "msg_mock", "role": "assistant", "status": "in_progress", "content": []}}),
            )?;
            named(
                &mut sse,
                "response.content_part.added",
                json!({"output_index": 0, "content_index": 0, "item_id": "msg_mock", "part": {"type": "output_text", "text": "", "annotations": []}}),
            )?;
        } else {
            named(
                &mut sse,
                "message_start",
                json!({"message": {
                    "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": prompt, "output_tokens": 0},
                }}),
            )?;
            named(
                &mut sse,
                "content_block_start",
                json!({"index": 0, "content_block": {"type": "text", "text": ""}}),
            )?;
        }
        for i in 0..completion {
            if fail == "reset" && i == 2 {
                let _ = sse.w.flush();
                let _ = sse.w.shutdown(std::net::Shutdown::Both);
                return Ok(false);
            }
            let tok = format!("tok{i} ");
            if responses {
                named(
                    &mut sse,
                    "response.output_text.delta",
                    json!({"output_index": 0, "content_index": 0, "item_id": "msg_mock", "delta": tok, "logprobs": []}),
                )?;
            } else {
                named(
                    &mut sse,
                    "content_block_delta",
                    json!({"index": 0, "delta": {"type": "text_delta", "text": tok}}),
                )?;
            }
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
        }
        if responses {
            named(
                &mut sse,
                "response.output_text.done",
                json!({"output_index": 0, "content_index": 0, "item_id": "msg_mock", "text": text, "logprobs": []}),
            )?;
            named(
                &mut sse,
                "response.completed",
                json!({"response": response("completed", completion, &text, responses_usage(completion))}),
            )?;
        } else {
            named(&mut sse, "content_block_stop", json!({"index": 0}))?;
            named(
                &mut sse,
                "message_delta",
                json!({"delta": {"stop_reason": "max_tokens"}, "usage": {"input_tokens": prompt, "output_tokens": completion}}),
            )?;
            named(&mut sse, "message_stop", json!({}))?;
            sse.event("[DONE]")?;
        }
        sse.w.write_all(b"0\r\n\r\n")?;
        Ok(true)
    }

    /// Transcriptions and translations: a multipart form (model, file, stream and the
    /// flattened stream options). Not streamed: `{"text", "usage": {"type":
    /// "duration", "seconds"}}` (one second per 16,000 bytes of audio, at least 1);
    /// streamed: chat-like chunks, the usage chunk only with `stream_include_usage`.
    fn audio(&self, req: &http::Request, w: &mut TcpStream) -> std::io::Result<bool> {
        let form = match form_fields(req) {
            Ok(f) => f,
            Err(e) => return http::respond(w, 400, "application/json", &error_json(400, e)),
        };
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let model = field("model")
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        if !self.models.contains(&model) {
            return http::respond(
                w,
                404,
                "application/json",
                &error_json(404, &format!("The model `{model}` does not exist.")),
            );
        }
        let audio_len = field("file").map_or(0, |f| f.len() as u64);
        let yes = |k: &str| field(k).is_some_and(|v| v.eq_ignore_ascii_case(b"true"));
        let completion = req
            .header("x-mock-tokens")
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.tokens);
        let text: String = (0..completion).map(|i| format!("tok{i} ")).collect();
        if !yes("stream") {
            let resp = json!({"text": text, "usage": {"type": "duration", "seconds": (audio_len / 16_000).max(1)}});
            return http::respond(w, 200, "application/json", resp.to_string().as_bytes());
        }
        let prompt = (audio_len / 1_000).max(1);
        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")?;
        let mut sse = SseWriter { w, split: 0 };
        let continuous = yes("stream_continuous_usage_stats");
        let usage = |c: u64| json!({"prompt_tokens": prompt, "total_tokens": prompt + c, "completion_tokens": c});
        for i in 0..completion {
            let mut v = json!({"id": "trsc-mock", "object": "transcription.chunk", "created": 0, "model": model, "choices": [{"delta": {"content": format!("tok{i} ")}, "finish_reason": null, "stop_reason": null}]});
            if continuous {
                v["usage"] = usage(i + 1);
            }
            sse.event(&v.to_string())?;
        }
        if yes("stream_include_usage") {
            let v = json!({"id": "trsc-mock", "object": "transcription.chunk", "created": 0, "model": model, "choices": [], "usage": usage(completion)});
            sse.event(&v.to_string())?;
        }
        sse.event("[DONE]")?;
        sse.w.write_all(b"0\r\n\r\n")?;
        Ok(true)
    }
}

/// The parts of a `multipart/form-data` body: (name, content), by a plain split on
/// the delimiter (the proxy's own scanner is not used: the mock checks it).
fn form_fields(req: &http::Request) -> Result<Vec<(String, Vec<u8>)>, &'static str> {
    let ctype = req.header("content-type").unwrap_or("");
    let boundary = ctype
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_string())
        .ok_or("no multipart boundary")?;
    let delimiter = format!("--{boundary}");
    let body = &req.body;
    let mut parts = Vec::new();
    let mut at = memchr::memmem::find(body, delimiter.as_bytes()).ok_or("no first boundary")?;
    loop {
        let rest = &body[at + delimiter.len()..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        let rest = rest.strip_prefix(b"\r\n").ok_or("bad delimiter line")?;
        let head_end = memchr::memmem::find(rest, b"\r\n\r\n").ok_or("no part head end")?;
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let name = head
            .split(';')
            .find_map(|p| p.trim().strip_prefix("name="))
            .map(|n| n.trim_matches('"').to_string())
            .ok_or("part without a name")?;
        let content = &rest[head_end + 4..];
        let next = format!("\r\n{delimiter}");
        let end = memchr::memmem::find(content, next.as_bytes()).ok_or("part without an end")?;
        parts.push((name, content[..end].to_vec()));
        at = (content.as_ptr() as usize - body.as_ptr() as usize) + end + 2;
    }
}

/// A chat stream the pacer feeds: role chunk, `total` tokens one per `every`, the
/// last chunk, the usage chunk if asked, `[DONE]`, and the end of the chunked body.
struct Paced {
    w: TcpStream,
    pending: Vec<u8>,
    /// Events written so far (the role chunk is event 0).
    next: u64,
    total: u64,
    every: Duration,
    due: std::time::Instant,
    /// The model name as a JSON string.
    model: String,
    prompt_tokens: u64,
    include_usage: bool,
    continuous: bool,
}

impl Paced {
    fn usage(&self, c: u64) -> String {
        let p = self.prompt_tokens;
        format!(
            r#"{{"prompt_tokens":{p},"total_tokens":{},"completion_tokens":{c}}}"#,
            p + c
        )
    }

    fn chunk(&self, delta: &str, finish: &str, c: u64) -> String {
        let usage = if self.continuous {
            format!(r#","usage":{}"#, self.usage(c))
        } else {
            String::new()
        };
        format!(
            r#"{{"id":"cmpl-mock","object":"chat.completion.chunk","created":0,"model":{},"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]{usage}}}"#,
            self.model
        )
    }

    /// The bytes of event `next` (the last one carries everything to the end).
    fn render(&self) -> Vec<u8> {
        let mut events = Vec::new();
        let i = self.next;
        if i == 0 {
            events.push(self.chunk(r#"{"role":"assistant","content":""}"#, "null", 0));
        } else if i <= self.total {
            events.push(self.chunk(&format!(r#"{{"content":"tok{} "}}"#, i - 1), "null", i));
        } else {
            let last = self.chunk(
                r#"{"content":""}"#,
                r#""length","stop_reason":null"#,
                self.total,
            );
            events.push(last);
            if self.include_usage {
                events.push(format!(
                    r#"{{"id":"cmpl-mock","object":"chat.completion.chunk","created":0,"model":{},"choices":[],"usage":{}}}"#,
                    self.model,
                    self.usage(self.total)
                ));
            }
            events.push("[DONE]".into());
        }
        let mut out = Vec::new();
        for e in events {
            let ev = format!("data: {e}\n\n");
            out.extend_from_slice(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes());
        }
        if i > self.total {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        out
    }

    /// Writes what is due; `false` once the stream is over (or the peer is gone).
    fn tick(&mut self, now: std::time::Instant) -> bool {
        if self.pending.is_empty() && now >= self.due {
            if self.next > self.total + 1 {
                return false;
            }
            self.pending = self.render();
            self.next += 1;
            self.due += if self.next == 1 {
                Duration::ZERO
            } else {
                self.every
            };
        }
        while !self.pending.is_empty() {
            match self.w.write(&self.pending) {
                Ok(0) => return false,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        self.next <= self.total + 1
    }
}

/// The one pacer thread, started on first use.
fn pacer() -> &'static std::sync::mpsc::Sender<Paced> {
    static PACER: std::sync::OnceLock<std::sync::mpsc::Sender<Paced>> = std::sync::OnceLock::new();
    PACER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Paced>();
        std::thread::spawn(move || {
            let mut live: Vec<Paced> = Vec::new();
            loop {
                if live.is_empty() {
                    match rx.recv() {
                        Ok(p) => live.push(p),
                        Err(_) => return,
                    }
                }
                live.extend(rx.try_iter());
                let now = std::time::Instant::now();
                live.retain_mut(|p| p.tick(now));
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        tx
    })
}

/// Writes `data: ...\n\n` events as HTTP chunks, optionally in small pieces.
struct SseWriter<'a> {
    w: &'a mut TcpStream,
    split: usize,
}

impl SseWriter<'_> {
    fn event(&mut self, data: &str) -> std::io::Result<()> {
        self.raw(&format!("data: {data}\n\n"))
    }

    /// `event: NAME` and `data: ...` (Responses, Anthropic Messages).
    fn named(&mut self, event: &str, data: &str) -> std::io::Result<()> {
        self.raw(&format!("event: {event}\ndata: {data}\n\n"))
    }

    fn raw(&mut self, ev: &str) -> std::io::Result<()> {
        let bytes = ev.as_bytes();
        let step = if self.split == 0 {
            bytes.len()
        } else {
            self.split
        };
        for piece in bytes.chunks(step) {
            let mut out = format!("{:x}\r\n", piece.len()).into_bytes();
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
            self.w.write_all(&out)?;
            if self.split > 0 {
                self.w.flush()?;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}
