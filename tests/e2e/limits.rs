//! Per-key limits on one proxy with two workers: rpm, tpm, requests in flight and a
//! token budget, each exact; the 429's shape and headers; the SDK's retry.

use crate::harness::*;
use std::time::{Duration, SystemTime};

const KEY: &str = "sk-limits-test-0123456789";

fn stack(limits: &str) -> Stack {
    Stack::with(
        &format!(
            "auth:\n  enabled: true\n  keys:\n    - key: {KEY}\n      user_id: carol\n{limits}    - key: sk-sentinel-0123456789abc\n      user_id: sentinel\n"
        ),
        &[],
    )
}

pub fn call(addr: &str, key: &str, id: &str, stream: bool) -> Response {
    post_json(
        addr,
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {key}")),
            ("x-request-id", id),
        ],
        &chat(stream, 2),
    )
}

/// Waits until the current UTC minute has at least `secs` left, so a test's requests
/// all fall in one rpm/tpm window.
pub fn with_minute_left(secs: u64) {
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let left = 60_000 - ms(SystemTime::now()) % 60_000;
    if left < secs * 1000 {
        std::thread::sleep(Duration::from_millis(left + 50));
    }
}

/// The records of `ids` arrived and no other (a sentinel request from another key,
/// sent after, has its record: anything before it would have arrived first).
fn only_records_of(s: &Stack, ids: &[String]) {
    let r = call(s.addr(), "sk-sentinel-0123456789abc", "sentinel", false);
    assert_eq!(r.status, 200);
    s.record("sentinel");
    let mut got: Vec<String> = fetch_records(&s.receiver)
        .iter()
        .filter_map(|r| r["client_request_id"].as_str().map(str::to_string))
        .filter(|id| id != "sentinel")
        .collect();
    got.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn rpm_is_exact_across_workers_and_429s_say_when() {
    let s = stack("      rpm: 5\n");
    with_minute_left(20);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let addr = s.addr().to_string();
            std::thread::spawn(move || {
                (
                    format!("rpm-{i}"),
                    call(&addr, KEY, &format!("rpm-{i}"), i % 2 == 0),
                )
            })
        })
        .collect();
    let results: Vec<(String, Response)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.status == 200)
        .map(|(id, _)| id.clone())
        .collect();
    let refused: Vec<&Response> = results
        .iter()
        .filter(|(_, r)| r.status == 429)
        .map(|(_, r)| r)
        .collect();
    assert_eq!((ok.len(), refused.len()), (5, 3));
    for r in &refused {
        let body = r.json();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["type"], "requests");
        let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&after));
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("5"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
        assert!(
            r.header("x-ratelimit-reset-requests")
                .unwrap()
                .ends_with('s')
        );
        assert!(r.header("x-request-id").is_some());
    }
    // A success says what is left, like OpenAI's.
    let remaining: Vec<u64> = results
        .iter()
        .filter(|(_, r)| r.status == 200)
        .map(|(_, r)| {
            r.header("x-ratelimit-remaining-requests")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let mut sorted = remaining.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
    // Refused requests reached no backend and have no record.
    only_records_of(&s, &ok);
    assert_eq!(
        metric(s.addr(), "llmproxy_rate_limited_total{reason=\"rpm\"}"),
        3.0
    );
}

#[test]
fn tokens_per_minute_and_budgets_are_charged_from_usage() {
    // Each request here uses 7 tokens (5 prompt + 2 completion).
    let s = stack("      tpm: 10\n      budget: {tokens: 1000, period: month}\n");
    with_minute_left(20);
    assert_eq!(call(s.addr(), KEY, "tpm-0", false).status, 200);
    s.record("tpm-0");
    // 7 of 10 used: admitted, and it may overshoot (charged after the fact).
    let r = call(s.addr(), KEY, "tpm-1", true);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("3"));
    s.record("tpm-1");
    let r = call(s.addr(), KEY, "tpm-2", false);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"));
    only_records_of(&s, &["tpm-0".into(), "tpm-1".into()]);

    let s = stack("      budget: {tokens: 10, period: total}\n");
    assert_eq!(call(s.addr(), KEY, "b-0", false).status, 200);
    s.record("b-0");
    assert_eq!(call(s.addr(), KEY, "b-1", false).status, 200);
    s.record("b-1");
    let r = call(s.addr(), KEY, "b-2", false);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "insufficient_quota");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(
        metric(s.addr(), "llmproxy_rate_limited_total{reason=\"budget\"}"),
        1.0
    );
}

#[test]
fn in_flight_limit_frees_when_a_request_ends_and_the_sdk_retries_as_told() {
    let s = stack(
        "      max_concurrent: 1\n    - key: sk-spent-0123456789abcdef\n      user_id: spent\n      budget: {tokens: 1, period: day}\n",
    );
    // Spend the second key's budget.
    assert_eq!(
        call(s.addr(), "sk-spent-0123456789abcdef", "spend", false).status,
        200
    );
    s.record("spend");
    // A slow stream (200 tokens, 100 ms apart) holds the key's only slot until its
    // caller hangs up below: the test decides when the slot frees, not a timer.
    let mut holder = std::net::TcpStream::connect(s.addr()).unwrap();
    let mut body = chat(true, 200);
    body["stream"] = true.into();
    write_request(
        &mut holder,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {KEY}")),
            ("content-type", "application/json"),
            ("x-request-id", "holder"),
            ("x-mock-token-delay-ms", "100"),
        ],
        body.to_string().as_bytes(),
        false,
    );
    wait_until("the slow stream holds the slot", 10, || {
        metric(
            s.addr(),
            &format!("llmproxy_backend_in_flight{{backend=\"{}\"}}", s.mock.addr),
        ) >= 1.0
    });
    let r = call(s.addr(), KEY, "busy", false);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    // The SDK gets the same 429 and waits as told; the slot frees meanwhile (the
    // holder hangs up), so its retry succeeds. The spent key's 429 is not retried.
    let sdk = std::process::Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_limits.py"))
        .args([
            &format!("http://{}/v1", s.addr()),
            KEY,
            "sk-spent-0123456789abcdef",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let busy = "llmproxy_rate_limited_total{reason=\"concurrency\"}";
    wait_until("the SDK's first try is refused", 60, || {
        metric(s.addr(), busy) >= 2.0
    });
    drop(holder);
    let out = sdk.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let waited: f64 = String::from_utf8_lossy(&out.stdout)
        .split("waited ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap();
    // It waited as Retry-After said (its own first backoff would be ~0.5 s).
    assert!(waited >= 0.9, "waited {waited}");
    assert_eq!(
        metric(s.addr(), "llmproxy_rate_limited_total{reason=\"budget\"}"),
        1.0
    );
    assert_eq!(s.record("holder")["outcome"], "client_disconnected");
    s.record("sdk-limited");
}

#[test]
fn without_a_store_a_budget_survives_a_restart() {
    let mut s = stack("      budget: {tokens: 14, period: day}\n");
    for id in ["keep-0", "keep-1"] {
        assert_eq!(call(s.addr(), KEY, id, false).status, 200);
        s.record(id);
    }
    // A clean stop writes the budgets to the state file beside the spool (the
    // default ./usage-spool here), and the next start reads them back.
    s.proxy.signal(libc::SIGTERM);
    let t = std::time::Instant::now();
    assert_eq!(s.proxy.wait_exit(Duration::from_secs(20)), Some(0));
    eprintln!("stopped in {:?}", t.elapsed());
    let state = std::fs::read_to_string(s.proxy.dir.join("usage-spool/limits-state.json")).unwrap();
    assert!(state.contains("\"tokens\":14"), "{state}");
    assert!(!state.contains(KEY), "the state file holds no key");
    let mut cmd = std::process::Command::new(proxy_bin());
    cmd.arg("--config")
        .arg(s.proxy.dir.join("config.yaml"))
        .current_dir(&s.proxy.dir);
    let dir = s.proxy.dir.clone();
    s.proxy = spawn(cmd);
    s.proxy.dir = dir;
    assert!(
        s.proxy.output().contains("1 budgets restored"),
        "{}",
        s.proxy.output()
    );
    let r = call(s.addr(), KEY, "keep-2", false);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "insufficient_quota");
}
