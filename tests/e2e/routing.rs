//! Many backends, one proxy: weights, least-loaded routing, health checks that act,
//! model routing, the merged model list, metrics read by a real Prometheus parser,
//! SIGHUP reload, and the access log.

use crate::harness::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

fn backends_yaml(list: &[(&Proc, u32, &[&str])]) -> String {
    let mut y = String::from("backends:\n");
    for (m, w, models) in list {
        y.push_str(&format!(
            "  - url: \"http://{}\"\n    weight: {w}\n",
            m.addr
        ));
        if !models.is_empty() {
            y.push_str(&format!("    models: [{}]\n", models.join(", ")));
        }
    }
    y
}

fn proxy_for(backends: &str, receiver: &Proc, extra: &str) -> Proc {
    proxy_with_config(&format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\n{backends}usage_hook:\n  enabled: true\n  url: \"http://{}/x\"\n{extra}",
        receiver.addr
    ))
}

fn served_by(records: &[Value]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in records {
        *m.entry(r["backend_url"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    m
}

fn url(p: &Proc) -> String {
    format!("http://{}", p.addr)
}

#[test]
fn idle_backends_share_traffic_by_weight() {
    let (a, b) = (mock(&[]), mock(&[]));
    let rx = receiver(&[]);
    let p = proxy_for(&backends_yaml(&[(&a, 3, &[]), (&b, 1, &[])]), &rx, "");
    for i in 0..80 {
        let r = post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-request-id", &format!("w-{i}"))],
            &chat(false, 1),
        );
        assert_eq!(r.status, 200);
    }
    let by = served_by(&wait_records(&rx, 80));
    assert_eq!(by.get(&url(&a)), Some(&60), "{by:?}");
    assert_eq!(by.get(&url(&b)), Some(&20), "{by:?}");
}

#[test]
fn the_backend_with_fewer_streams_in_flight_is_chosen() {
    let (a, b) = (mock(&[]), mock(&[]));
    let rx = receiver(&[]);
    let p = proxy_for(&backends_yaml(&[(&a, 1, &[]), (&b, 1, &[])]), &rx, "");
    // A long stream occupies one backend...
    let addr = p.addr.clone();
    let long = std::thread::spawn(move || {
        post_json(
            &addr,
            "/v1/chat/completions",
            &[("x-request-id", "long"), ("x-mock-token-delay-ms", "100")],
            &chat(true, 15),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    // ...so every short request meanwhile goes to the other one.
    for i in 0..10 {
        post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-request-id", &format!("short-{i}"))],
            &chat(false, 1),
        );
    }
    assert!(long.join().unwrap().complete);
    let records = wait_records(&rx, 11);
    let long_on = records
        .iter()
        .find(|r| r["client_request_id"] == "long")
        .unwrap()["backend_url"]
        .clone();
    for r in records.iter().filter(|r| r["client_request_id"] != "long") {
        assert_ne!(
            r["backend_url"], long_on,
            "short request sent to the busy backend"
        );
    }
}

#[test]
fn a_dead_backend_stops_getting_traffic_and_comes_back() {
    let a = mock(&[]);
    let port = free_port();
    let b = mock(&["--port", &port.to_string()]);
    let rx = receiver(&[]);
    let p = proxy_for(
        &backends_yaml(&[(&a, 1, &[]), (&b, 1, &[])]),
        &rx,
        "health_check:\n  interval: 300ms\n  unhealthy_after: 1\n  healthy_after: 1\n",
    );
    let b_url = url(&b);
    drop(b); // killed
    // Every request still succeeds: a refused connection moves on to the other backend.
    for i in 0..20 {
        let r = post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-request-id", &format!("down-{i}"))],
            &chat(false, 1),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let by = served_by(&wait_records(&rx, 20));
    assert_eq!(by.get(&url(&a)), Some(&20), "{by:?}");
    let h = request(&p.addr, "GET", "/health", &[], b"").json();
    let bh = h["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["url"] == b_url.as_str())
        .unwrap()
        .clone();
    assert_eq!(bh["healthy"], false);
    assert!(bh["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    let m = request(&p.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        m.contains(&format!(
            "llmproxy_backend_up{{backend=\"127.0.0.1:{port}\"}} 0"
        )),
        "{m}"
    );

    // It restarts: within a check interval it is back in rotation.
    let _b2 = mock(&["--port", &port.to_string()]);
    wait_until("backend healthy again", 10, || {
        request(&p.addr, "GET", "/health", &[], b"").json()["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["healthy"] == true)
    });
    for i in 0..10 {
        post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-request-id", &format!("up-{i}"))],
            &chat(false, 1),
        );
    }
    let records = wait_records(&rx, 30);
    let back = records
        .iter()
        .filter(|r| {
            r["client_request_id"].as_str().unwrap().starts_with("up-")
                && r["backend_url"] == b_url.as_str()
        })
        .count();
    assert_eq!(back, 5, "traffic shared again");
}

#[test]
fn models_route_and_merge() {
    let a = mock(&["--models", "m-a,shared"]);
    let b = mock(&["--models", "m-b,shared"]);
    let rx = receiver(&[]);
    let p = proxy_for(
        &backends_yaml(&[(&a, 1, &["m-a", "shared"]), (&b, 1, &["m-b", "shared"])]),
        &rx,
        "",
    );
    for (model, want) in [("m-a", &a), ("m-b", &b), ("m-a", &a), ("m-b", &b)] {
        let id = format!("route-{model}-{}", rand_suffix());
        let r = post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-request-id", &id)],
            &json!({"model": model, "messages": [], "max_tokens": 1}),
        );
        assert_eq!(r.status, 200);
        let rec = wait_record(&rx, &id);
        assert_eq!(rec["backend_url"], url(want).as_str());
    }
    let r = post_json(
        &p.addr,
        "/v1/chat/completions",
        &[],
        &json!({"model": "nope", "messages": []}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let ids: Vec<String> = request(&p.addr, "GET", "/v1/models", &[], b"").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["m-a", "shared", "m-b"]);
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn metrics_parse_as_prometheus_text_and_match_traffic() {
    let python = python();
    let probe = std::process::Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "prometheus_client is not importable with {python}: run scripts/test.sh (it makes .venv), or `pip install prometheus_client` and set LLMPROXY_TEST_PYTHON"
    );
    let s = Stack::start();
    for i in 0..6 {
        post_json(
            s.addr(),
            "/v1/chat/completions",
            &[("x-request-id", &format!("pm-{i}"))],
            &chat(i % 2 == 0, 2),
        );
    }
    post_json(
        s.addr(),
        "/v1/chat/completions",
        &[],
        &json!({"model": "nope"}),
    );
    s.records(6);
    wait_until("deliveries counted", 10, || {
        metric(s.addr(), "llmproxy_webhook_success_total") == 6.0
    });
    let text = request(s.addr(), "GET", "/metrics", &[], b"").text();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, HashMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    let sum = |name: &str, f: &dyn Fn(&HashMap<String, String>) -> bool| -> f64 {
        samples
            .iter()
            .filter(|(n, l, _)| n == name && f(l))
            .map(|(_, _, v)| v)
            .sum()
    };
    let backend = s.mock.addr.clone();
    assert_eq!(
        sum("llmproxy_requests_total", &|l| l["path"]
            == "/v1/chat/completions"
            && l["backend"] == backend
            && l["status"] == "200"),
        6.0
    );
    assert_eq!(
        sum("llmproxy_requests_total", &|l| l["stream"] == "true"
            && l["status"] == "200"),
        3.0
    );
    assert_eq!(
        sum("llmproxy_requests_total", &|l| l["status"] == "404"
            && l["backend"] == "none"),
        1.0
    );
    assert_eq!(
        sum("llmproxy_usage_tokens_total", &|l| l["type"]
            == "completion"),
        12.0
    );
    assert_eq!(
        sum("llmproxy_usage_tokens_total", &|l| l["type"] == "prompt"),
        30.0
    );
    assert_eq!(sum("llmproxy_webhook_success_total", &|_| true), 6.0);
    assert_eq!(sum("llmproxy_ttft_ms_count", &|_| true), 3.0);
    assert_eq!(sum("llmproxy_latency_ms_count", &|_| true), 6.0);
    assert_eq!(
        sum("llmproxy_backend_up", &|l| l["backend"] == backend),
        1.0
    );
    assert_eq!(sum("llmproxy_backend_in_flight", &|_| true), 0.0);
    // No user, key or request id ever becomes a label.
    for (_, labels, _) in &samples {
        for v in labels.values() {
            assert!(
                !v.starts_with("pm-") && !v.starts_with("req_") && !v.starts_with("sk-"),
                "{labels:?}"
            );
        }
    }
}

#[test]
fn sighup_adds_a_key_and_a_backend_without_a_failed_request() {
    let (a, b) = (mock(&[]), mock(&[]));
    let rx = receiver(&[]);
    let keys1 =
        "auth:\n  enabled: true\n  keys:\n    - {key: sk-first-key-0123456789, user_id: first}\n";
    let mut p = proxy_for(&backends_yaml(&[(&a, 1, &[])]), &rx, keys1);
    let cfg_path = p.dir.join("config.yaml");
    // Traffic runs throughout the reload, on keep-alive and new connections alike.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (addr, stop2) = (p.addr.clone(), stop.clone());
    let traffic = std::thread::spawn(move || {
        let mut failures = Vec::new();
        let mut n = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let r = post_json(
                &addr,
                "/v1/chat/completions",
                &[
                    ("authorization", "Bearer sk-first-key-0123456789"),
                    ("x-request-id", &format!("hup-{n}")),
                ],
                &chat(n % 2 == 0, 2),
            );
            if r.status != 200 || !r.complete {
                failures.push((r.status, r.text()));
            }
        }
        (n, failures)
    });
    std::thread::sleep(Duration::from_millis(300));
    let keys2 = format!("{keys1}    - {{key: sk-second-key-0123456789, user_id: second}}\n");
    std::fs::write(&cfg_path, format!("listen: \"127.0.0.1:0\"\nworkers: 1\n{}usage_hook:\n  enabled: true\n  url: \"http://{}/x\"\n{keys2}", backends_yaml(&[(&a, 1, &[]), (&b, 1, &[])]), rx.addr)).unwrap();
    p.signal(libc::SIGHUP);
    wait_until("the new key works", 10, || {
        post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-api-key", "sk-second-key-0123456789")],
            &chat(false, 1),
        )
        .status
            == 200
    });
    std::thread::sleep(Duration::from_millis(300));
    // An invalid file is refused; the running configuration stays.
    std::fs::write(&cfg_path, "backends: []\nsurprise: 1\n").unwrap();
    p.signal(libc::SIGHUP);
    // Its effect first (the refusal is logged), then the old key is checked.
    wait_until("the reload refused", 10, || {
        p.output().contains("reload refused")
    });
    assert_eq!(
        post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-api-key", "sk-second-key-0123456789")],
            &chat(false, 1)
        )
        .status,
        200
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, failures) = traffic.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {n} requests failed across the reload: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let records = wait_records(&rx, n);
    assert!(
        records.iter().any(|r| r["backend_url"] == url(&b).as_str()),
        "the new backend got no traffic"
    );
    assert!(records.iter().any(|r| r["user_id"] == "second"));
    assert_eq!(p.wait_exit(Duration::from_millis(1)), None, "still running");
}

#[test]
fn access_log_has_one_line_per_request_and_no_full_key() {
    let dir = temp_dir();
    let log = dir.join("access.jsonl");
    let s = Stack::with(
        &format!(
            "access_log: \"{}\"\nauth:\n  enabled: true\n  keys:\n    - {{key: sk-access-log-secret-123456, user_id: al}}\n",
            log.display()
        ),
        &[],
    );
    let key = [("authorization", "Bearer sk-access-log-secret-123456")];
    post_json(
        s.addr(),
        "/v1/chat/completions",
        &[key[0], ("x-request-id", "al-1")],
        &chat(true, 3),
    );
    post_json(
        s.addr(),
        "/v1/chat/completions",
        &[("x-request-id", "al-2")],
        &chat(true, 3),
    );
    request(s.addr(), "GET", "/health?token=secret-query", &[], b"");
    wait_until("three log lines", 10, || {
        std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) >= 3
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("sk-access-log-secret-123456") && !text.contains("secret-query"),
        "{text}"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let l1 = lines
        .iter()
        .find(|l| l["client_request_id"] == "al-1")
        .unwrap();
    assert_eq!(
        (
            l1["status"].as_u64(),
            l1["user_id"].as_str(),
            l1["model"].as_str()
        ),
        (Some(200), Some("al"), Some("mock-model"))
    );
    assert_eq!(
        (
            l1["prompt_tokens"].as_u64(),
            l1["completion_tokens"].as_u64()
        ),
        (Some(5), Some(3))
    );
    assert_eq!(l1["outcome"], "completed");
    assert_eq!(l1["api_key"], "sk-acc...3456");
    assert_eq!(l1["backend"], s.mock.addr.as_str());
    let l2 = lines
        .iter()
        .find(|l| l["client_request_id"] == "al-2")
        .unwrap();
    assert_eq!(l2["status"], 401);
    assert!(lines.iter().any(|l| l["path"] == "/health"));
}

#[test]
fn models_auto_follows_what_the_backend_serves() {
    let port = free_port();
    let a = mock(&["--port", &port.to_string(), "--models", "base"]);
    let b = mock(&["--models", "other"]);
    let rx = receiver(&[]);
    let p = proxy_for(
        &format!(
            "backends:\n  - url: \"http://127.0.0.1:{port}\"\n    models: auto\n  - url: \"http://{}\"\n    models: [other]\n",
            b.addr
        ),
        &rx,
        "health_check:\n  interval: 300ms\n",
    );
    let ask = |model: &str| {
        post_json(
            &p.addr,
            "/v1/chat/completions",
            &[],
            &json!({"model": model, "messages": [], "max_tokens": 1}),
        )
        .status
    };
    assert_eq!(ask("base"), 200);
    assert_eq!(ask("other"), 200);
    assert_eq!(ask("lora-1"), 404);
    // A LoRA adapter is added to the backend (here: it restarts serving one more model):
    // routed at the next health check, with no proxy config change.
    drop(a);
    let _a2 = mock(&["--port", &port.to_string(), "--models", "base,lora-1"]);
    wait_until("lora-1 routed", 10, || ask("lora-1") == 200);
    let records = wait_records(&rx, 3);
    let lora = records.iter().filter(|r| r["model"] == "lora-1").count();
    assert!(lora >= 1);
    assert!(
        records
            .iter()
            .filter(|r| r["model"] == "lora-1")
            .all(|r| r["backend_url"] == format!("http://127.0.0.1:{port}").as_str())
    );
}

#[test]
fn a_backend_restart_between_requests_costs_no_request() {
    // Pooled connections to a backend that restarted are dead. One reused within
    // moments is not looked at before use (that costs a syscall per request): the
    // request fails before any response byte and goes again on a fresh connection.
    // One idle for longer is looked at first. Either way the caller sees nothing.
    let mut backend = mock(&[]);
    let port = backend.addr.rsplit(':').next().unwrap().to_string();
    let rx = receiver(&[]);
    let p = proxy_for(&backends_yaml(&[(&backend, 1, &[])]), &rx, "");
    let mut n = 0;
    let mut send = |stream: bool| {
        n += 1;
        let r = post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-request-id", &format!("restart-{n}"))],
            &chat(stream, 3),
        );
        assert_eq!(r.status, 200, "request {n}: {}", r.text());
    };
    for i in 0..4 {
        send(i % 2 == 1);
    }
    backend.signal(libc::SIGKILL);
    backend.wait_exit(Duration::from_secs(5));
    let _again = mock(&["--port", &port]);
    for i in 0..4 {
        send(i % 2 == 1);
    }
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..2 {
        send(i % 2 == 1);
    }
    let records = wait_records(&rx, 10);
    assert_eq!(records.len(), 10);
    assert!(
        records.iter().all(|r| r["status_code"] == 200),
        "{records:?}"
    );
}

#[test]
fn a_killed_backend_sends_its_requests_to_the_healthy_one_and_no_502() {
    // Two backends, both with pooled connections; one is killed (listener closed). A
    // request picked for it fails on the dead pooled connection before any response
    // byte, the fresh connect is refused: nothing reached a backend, so it goes back
    // to routing and the healthy backend answers it.
    let a = mock(&[]);
    let a_port = a.addr.rsplit(':').next().unwrap().to_string();
    let mut b = mock(&[]);
    let rx = receiver(&[]);
    let p = proxy_for(
        &backends_yaml(&[(&a, 1, &[]), (&b, 1, &[])]),
        &rx,
        "health_check:\n  interval: 200ms\n  unhealthy_after: 1\n  healthy_after: 1\n",
    );
    let send = |id: String| {
        post_json(
            &p.addr,
            "/v1/chat/completions",
            &[("x-request-id", &id)],
            &chat(false, 1),
        )
    };
    for i in 0..4 {
        assert_eq!(send(format!("warm-{i}")).status, 200);
    }
    let by = served_by(&wait_records(&rx, 4));
    assert_eq!(by.len(), 2, "both backends pooled: {by:?}");
    b.signal(libc::SIGKILL);
    b.wait_exit(Duration::from_secs(5));
    for i in 0..4 {
        let r = send(format!("after-{i}"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let records = wait_records(&rx, 8);
    let after: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["client_request_id"]
                .as_str()
                .unwrap()
                .starts_with("after-")
        })
        .collect();
    assert_eq!(after.len(), 4, "{records:?}");
    assert!(
        after.iter().all(|r| r["backend_url"] == url(&a).as_str()),
        "{after:?}"
    );

    // No backend accepts a connection: 502, and no record (nothing reached a GPU).
    drop(a);
    let r = send("nowhere".into());
    assert_eq!(r.status, 502, "{}", r.text());
    // Sentinel: a backend comes back, a later request's record arrives; the 502's
    // record would have been delivered before it.
    let _a2 = mock(&["--port", &a_port]);
    let mut sentinel = None;
    wait_until("a backend back", 10, || {
        let r = send("sentinel".into());
        if r.status == 200 {
            sentinel = r.header("x-request-id").map(str::to_owned);
        }
        r.status == 200
    });
    let sentinel = sentinel.unwrap();
    wait_record(&rx, &sentinel);
    let all = fetch_records(&rx);
    assert!(
        !all.iter().any(|r| r["client_request_id"] == "nowhere"),
        "{all:?}"
    );
    assert!(all.iter().all(|r| r["status_code"] == 200), "{all:?}");
}
