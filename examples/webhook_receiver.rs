//! A billing webhook receiver for trying LLMProxy out: prints each usage record,
//! appends it to `usage_log.jsonl` (deduplicated by `request_id`, as a real receiver
//! must do under at-least-once delivery), and answers 200.
//!
//!     cargo run --example webhook_receiver -- --port 9000 [--log usage_log.jsonl]
//!         [--raw-log all.jsonl] [--fail-status 500 --fail-count 3] [--stall-ms 3000]
//!         [--delay-ms 100]
//!         [--quiet] [--no-store]
//!
//! `--raw-log` keeps every record POSTed, duplicates included (the tests count them); `--log none`
//! keeps no log, and `--no-store` keeps no records for `GET /records` (benchmarks).
//! When nothing is kept (`--no-store --log none`, quiet, no raw log), a record is read
//! no further than its leading `request_id` and no ids are remembered (the receiver
//! shares a core with the load generator in benchmarks); otherwise every record is
//! parsed as JSON and duplicates are recognised.
//! `--fail-status S --fail-count N` answers the first N POSTs with status S.
//! `--stall-ms N`: a receiver that hangs, then recovers: POSTs that arrive within N ms
//! of the first are answered only once those N ms have passed.
//! `--delay-ms N`: a slow receiver: every POST is answered N ms after it was read.
//! `--signing-secret whsec_...`: verify each POST's Standard Webhooks signature (the
//! proxy's `usage_hook.signing_secret`); a missing or bad one, or a timestamp more
//! than 5 minutes off, is answered 401.
//! `GET /records` returns the deduplicated records as a JSON array; `GET /stats` the
//! POSTs received (`{"posts":N}`).
//! A POST's body is one record, or (`usage_hook.batch` above 1) a JSON array of
//! records keyed by the first one's id and `+<count>`; each record is deduplicated by
//! its own `request_id`, and `--raw-log` gets a line per record.

#[path = "common/http.rs"]
mod http;

use serde_json::Value;
use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;

/// FNV-1a: ids are UUIDs, and SipHash was ~6 % of the receiver in benchmarks.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type Seen = HashSet<String, std::hash::BuildHasherDefault<Fnv>>;

/// The `request_id` of a record written the way llmproxy writes it (first member, no
/// escapes), without parsing the rest.
fn leading_id(body: &[u8]) -> Option<&str> {
    let rest = body.strip_prefix(b"{\"request_id\":\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    (rest[end] == b'"').then(|| std::str::from_utf8(&rest[..end]).ok())?
}

struct Receiver {
    seen: Seen,
    /// Each new record as it came (compact JSON), for `GET /records`.
    records: Vec<Box<[u8]>>,
    store: bool,
    log: Option<std::fs::File>,
    raw: Option<std::fs::File>,
    fail_left: u64,
    /// POSTs received (`GET /stats`).
    posts: u64,
}

/// The only field the receiver itself needs; the rest is kept as the bytes that came.
#[derive(serde::Deserialize)]
struct Id {
    #[serde(default)]
    request_id: String,
}

fn open(path: Option<String>) -> Option<std::fs::File> {
    path.filter(|p| p != "none").map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("cannot open {p}: {e}"))
    })
}

/// The record as one line of JSON: the body as it came, re-serialized only if it spans lines.
fn one_line(body: &[u8]) -> Vec<u8> {
    if body.contains(&b'\n') {
        serde_json::from_slice::<Value>(body)
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_default()
    } else {
        body.to_vec()
    }
}

fn write_line(f: &mut std::fs::File, body: &[u8]) {
    let mut line = one_line(body);
    line.push(b'\n');
    let _ = f.write_all(&line);
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
        seen: Seen::default(),
        records: Vec::new(),
        store: !std::env::args().any(|a| a == "--no-store"),
        log: open(Some(
            http::flag("--log").unwrap_or_else(|| "usage_log.jsonl".into()),
        )),
        raw: open(http::flag("--raw-log")),
        fail_left: http::flag("--fail-count")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        posts: 0,
    });
    let stall = std::time::Duration::from_millis(
        http::flag("--stall-ms")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    );
    let stall_until = std::sync::OnceLock::new();
    let delay = std::time::Duration::from_millis(
        http::flag("--delay-ms")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    );
    let signer = http::flag("--signing-secret").map(|s| {
        llmproxy::delivery::signing::Signer::parse(&s).unwrap_or_else(|e| {
            eprintln!("webhook-receiver: --signing-secret: {e}");
            std::process::exit(2)
        })
    });
    let listener = http::listen("webhook-receiver", &host, port);
    http::serve_batched(listener, move |req, w| {
        if req.method == "GET" && req.path == "/stats" {
            let posts = state.lock().map_or(0, |s| s.posts);
            let body = format!("{{\"posts\":{posts}}}");
            http::respond_into(w, 200, "application/json", body.as_bytes());
            return Ok(true);
        }
        if req.method == "GET" && req.path == "/records" {
            let mut body = b"[".to_vec();
            if let Ok(s) = state.lock() {
                for (i, r) in s.records.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(r);
                }
            }
            body.push(b']');
            http::respond_into(w, 200, "application/json", &body);
            return Ok(true);
        }
        if req.method != "POST" {
            http::respond_into(w, 404, "text/plain", b"not found");
            return Ok(true);
        }
        if let Some(signer) = &signer {
            let h = |n: &str| req.header(n).unwrap_or("");
            let ts: u64 = h("webhook-timestamp").parse().unwrap_or(0);
            let fresh = llmproxy::delivery::signing::unix_now().abs_diff(ts) <= 300;
            if !fresh || !signer.verify(h("webhook-id"), ts, &req.body, h("webhook-signature")) {
                http::respond_into(w, 401, "text/plain", b"bad or missing webhook signature");
                return Ok(true);
            }
        }
        if !stall.is_zero() {
            let until = *stall_until.get_or_init(|| std::time::Instant::now() + stall);
            std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
        }
        std::thread::sleep(delay);
        let Ok(mut s) = state.lock() else {
            http::respond_into(w, 500, "text/plain", b"poisoned");
            return Ok(true);
        };
        s.posts += 1;
        if s.fail_left > 0 {
            s.fail_left -= 1;
            http::respond_into(w, fail_status, "text/plain", b"failing on purpose");
            return Ok(true);
        }
        let keeps_nothing = quiet && !s.store && s.log.is_none() && s.raw.is_none();
        // usage_hook.batch above 1: a JSON array of records, keyed by the first
        // record's id and `+<count>`; each record is deduplicated by its own id.
        let array = req.body.first() == Some(&b'[');
        if keeps_nothing {
            // Nothing is kept, so there is nothing to deduplicate: no id set either
            // (inserting into an ever-growing set was ~30 % of this receiver under
            // load, on the core the benchmark's load generator needs).
            let ok = if array {
                true
            } else {
                leading_id(&req.body).is_some() || serde_json::from_slice::<Id>(&req.body).is_ok()
            };
            if ok {
                http::respond_into(w, 200, "application/json", b"{\"ok\":true}");
            } else {
                http::respond_into(w, 400, "text/plain", b"not json");
            }
            return Ok(true);
        }
        let records: Vec<Vec<u8>> = if array {
            match serde_json::from_slice::<Vec<Box<serde_json::value::RawValue>>>(&req.body) {
                Ok(v) if !v.is_empty() => v.iter().map(|r| r.get().as_bytes().to_vec()).collect(),
                _ => {
                    http::respond_into(w, 400, "text/plain", b"not a JSON array of records");
                    return Ok(true);
                }
            }
        } else {
            vec![req.body.to_vec()]
        };
        let mut ids = Vec::with_capacity(records.len());
        for r in &records {
            match serde_json::from_slice::<Id>(r) {
                Ok(Id { request_id }) => ids.push(request_id),
                Err(_) => {
                    http::respond_into(w, 400, "text/plain", b"not json");
                    return Ok(true);
                }
            }
        }
        let key = match ids.len() {
            1 => ids[0].clone(),
            n => format!("{}+{n}", ids[0]),
        };
        if req.header("idempotency-key") != Some(key.as_str()) {
            eprintln!("webhook-receiver: Idempotency-Key does not match request_id {key}");
        }
        for (body, id) in records.iter().zip(ids) {
            if let Some(raw) = s.raw.as_mut() {
                write_line(raw, body);
            }
            if s.seen.contains(&id) {
                if !quiet {
                    println!("[usage] duplicate {id} ignored");
                }
                continue;
            }
            if !quiet {
                let record: Value = serde_json::from_slice(body).unwrap_or_default();
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
                write_line(log, body);
            }
            if s.store {
                s.records.push(one_line(body).into_boxed_slice());
            }
            s.seen.insert(id);
        }
        http::respond_into(w, 200, "application/json", b"{\"ok\":true}");
        Ok(true)
    });
}
