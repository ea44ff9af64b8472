//! A billing webhook receiver for trying LLMProxy out: prints each usage record,
//! appends it to `usage_log.jsonl` (deduplicated by `request_id`, as a real receiver
//! must do under at-least-once delivery), and answers 200.
//!
//!     cargo run --example webhook_receiver -- --port 9000 [--log usage_log.jsonl]
//!         [--raw-log all.jsonl] [--fail-status 500 --fail-count 3] [--quiet]
//!
//! `--raw-log` keeps every POST, duplicates included (the tests count them).
//! `--fail-status S --fail-count N` answers the first N POSTs with status S.
//! `GET /records` returns the deduplicated records as a JSON array.

#[path = "common/http.rs"]
mod http;

use serde_json::Value;
use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;

struct Receiver {
    seen: HashSet<String>,
    records: Vec<Value>,
    log: Option<std::fs::File>,
    raw: Option<std::fs::File>,
    fail_left: u64,
}

fn open(path: Option<String>) -> Option<std::fs::File> {
    path.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("cannot open {p}: {e}"))
    })
}

fn main() {
    let port: u16 = http::flag("--port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(9000);
    let host = http::flag("--host").unwrap_or_else(|| "127.0.0.1".into());
    let quiet = std::env::args().any(|a| a == "--quiet");
    let fail_status: u16 = http::flag("--fail-status")
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let state = Mutex::new(Receiver {
        seen: HashSet::new(),
        records: Vec::new(),
        log: open(Some(
            http::flag("--log").unwrap_or_else(|| "usage_log.jsonl".into()),
        )),
        raw: open(http::flag("--raw-log")),
        fail_left: http::flag("--fail-count")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    });
    let listener = http::listen("webhook-receiver", &host, port);
    http::serve(listener, move |req, w| {
        if req.method == "GET" && req.path == "/records" {
            let body = state
                .lock()
                .map(|s| Value::Array(s.records.clone()).to_string())
                .unwrap_or_default();
            return http::respond(w, 200, "application/json", body.as_bytes());
        }
        if req.method != "POST" {
            return http::respond(w, 404, "text/plain", b"not found");
        }
        let Ok(mut s) = state.lock() else {
            return http::respond(w, 500, "text/plain", b"poisoned");
        };
        if s.fail_left > 0 {
            s.fail_left -= 1;
            return http::respond(w, fail_status, "text/plain", b"failing on purpose");
        }
        let record: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(_) => return http::respond(w, 400, "text/plain", b"not json"),
        };
        if let Some(raw) = s.raw.as_mut() {
            let _ = writeln!(raw, "{record}");
        }
        let id = record["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if req.header("idempotency-key") != Some(id.as_str()) {
            eprintln!("webhook-receiver: Idempotency-Key does not match request_id {id}");
        }
        if !s.seen.insert(id.clone()) {
            if !quiet {
                println!("[usage] duplicate {id} ignored");
            }
            return http::respond(w, 200, "application/json", b"{\"duplicate\":true}");
        }
        if !quiet {
            println!(
                "[usage] {id} user={} model={} prompt={} completion={} total={} stream={} outcome={} source={} status={} ttft_ms={}",
                record["user_id"],
                record["model"],
                record["prompt_tokens"],
                record["completion_tokens"],
                record["total_tokens"],
                record["is_stream"],
                record["outcome"],
                record["usage_source"],
                record["status_code"],
                record["ttft_ms"]
            );
            let _ = std::io::stdout().flush();
        }
        if let Some(log) = s.log.as_mut() {
            let _ = writeln!(log, "{record}");
        }
        s.records.push(record);
        http::respond(w, 200, "application/json", b"{\"ok\":true}")
    });
}
