//! Limits shared by several proxies through a real `redis-server` (Debian's), started
//! by each test on a free loopback port with its own temp dir (no persistence: a
//! restart loses its data, which the proxies must repair), stopped at the end.
//!
//! Without redis-server installed these tests say so and pass, unless
//! `LLMPROXY_REQUIRE_REDIS=1` (scripts/test.sh and CI set it and install the server),
//! where a missing server fails them.

use crate::harness::*;
use crate::limits::{call, with_minute_left};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

const SERVER: &str = "/usr/bin/redis-server";

struct Redis {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// `None` when redis-server is not installed and not required.
    fn start() -> Option<Redis> {
        if !installed(SERVER, "LLMPROXY_REQUIRE_REDIS", "redis-server") {
            return None;
        }
        let mut r = Redis {
            dir: temp_dir(),
            port: free_port(),
            child: None,
        };
        r.run();
        Some(r)
    }

    /// Starts the server (again, empty: no persistence) and waits for its port.
    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.join("redis.log")).unwrap();
        let child = Command::new(SERVER)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let port = self.port;
        wait_until("redis-server accepting connections", 20, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// SIGKILL: the server dies with its data.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Keys: `sk-rpm…` (10 requests a minute), `sk-tpm…` (70 tokens a minute: ten 7-token
/// requests), `sk-budget…` (35 tokens a month), `sk-free…` (limited only by a very
/// high rpm, for load).
fn config(redis: &str, mock: &str, receiver: &str, extra: &str) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\nworkers: 2\nbackends:\n  - url: \"http://{mock}\"\n    models: [mock-model]\nusage_hook:\n  enabled: true\n  url: \"http://{receiver}/llm-usage\"\n  timeout: 2s\n  retry: 2\nlimits_store: \"{redis}\"\nlimits_sync_interval: 50ms\n{extra}auth:\n  enabled: true\n  keys:\n    - {{key: sk-rpm-0123456789abcdef, user_id: r, rpm: 10}}\n    - {{key: sk-tpm-0123456789abcdef, user_id: t, tpm: 70}}\n    - {{key: sk-budget-0123456789abcd, user_id: b, budget: {{tokens: 35, period: month}}}}\n    - {{key: sk-free-0123456789abcdef, user_id: f, rpm: 1000000}}\n"
    )
}

/// Two proxies sharing `redis`, with one mock backend and one receiver.
struct Cluster {
    mock: Proc,
    receiver: Proc,
    proxies: Vec<Proc>,
    config: PathBuf,
}

impl Cluster {
    fn start(redis: &Redis, extra: &str) -> Cluster {
        let mock = mock(&[]);
        let receiver = receiver(&[]);
        let dir = temp_dir();
        let config = dir.join("config.yaml");
        std::fs::write(&config, config_text(redis, &mock, &receiver, extra)).unwrap();
        let mut c = Cluster {
            mock,
            receiver,
            proxies: Vec::new(),
            config,
        };
        c.proxies = vec![c.proxy(0), c.proxy(1)];
        c
    }

    /// Proxy `i`, in its own working directory (its spool), the same after a restart.
    fn proxy(&self, i: usize) -> Proc {
        let dir = self.config.with_file_name(format!("proxy-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(proxy_bin());
        cmd.arg("--config").arg(&self.config).current_dir(dir);
        spawn(cmd)
    }

    fn addr(&self, i: usize) -> String {
        self.proxies[i % self.proxies.len()].addr.clone()
    }

    /// `n` requests with `key`, one after another, alternating between the proxies,
    /// each sent once the other proxy has seen the one before: the statuses. With
    /// this pacing the shared limits are exact.
    fn paced(&self, key: &str, n: usize, prefix: &str) -> Vec<u16> {
        (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                let r = call(&self.addr(i), key, &id, false);
                if r.status == 200 {
                    // Charged (tpm) when its record is made.
                    wait_record(&self.receiver, &id);
                }
                self.synced(i);
                self.synced(i + 1);
                r.status
            })
            .collect()
    }

    /// Waits until proxy `i` has finished a sync that began after this call: two more
    /// than now (the one in progress may have begun before).
    fn synced(&self, i: usize) {
        let name = "llmproxy_limits_syncs_total";
        let now = metric(&self.addr(i), name);
        wait_until("a sync", 10, || metric(&self.addr(i), name) >= now + 2.0);
    }

    fn store_up(&self, i: usize) -> f64 {
        metric(&self.addr(i), "llmproxy_limits_store_up")
    }
}

fn config_text(redis: &Redis, mock: &Proc, receiver: &Proc, extra: &str) -> String {
    config(&redis.url(), &mock.addr, &receiver.addr, extra)
}

fn ok(statuses: &[u16]) -> usize {
    statuses.iter().filter(|&&s| s == 200).count()
}

#[test]
fn two_proxies_share_a_keys_rpm_and_tpm_exactly_once_synced() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let c = Cluster::start(&redis, "");
    assert_eq!((c.store_up(0), c.store_up(1)), (1.0, 1.0));
    with_minute_left(20);
    // 20 requests, 10 through each proxy: alone, each would admit all of its 10.
    // Shared, 10 in all: each request is sent once the other proxy has synced the
    // one before (what arrives within one interval is the documented overshoot).
    let rpm = c.paced("sk-rpm-0123456789abcdef", 20, "rpm");
    assert_eq!(ok(&rpm), 10, "{rpm:?}");
    assert!(rpm[..10].iter().all(|&s| s == 200), "{rpm:?}");
    // A refusal from one proxy counts the other's requests in its headers.
    let r = call(&c.addr(1), "sk-rpm-0123456789abcdef", "rpm-last", false);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let refused = metric(&c.addr(0), "llmproxy_rate_limited_total{reason=\"rpm\"}")
        + metric(&c.addr(1), "llmproxy_rate_limited_total{reason=\"rpm\"}");
    assert_eq!(refused as usize, 20 - ok(&rpm) + 1);
    // Tokens are charged from each record's usage (7 a request): 70 a minute is ten
    // requests, across both proxies.
    with_minute_left(20);
    let tpm = c.paced("sk-tpm-0123456789abcdef", 20, "tpm");
    assert_eq!(ok(&tpm), 10, "{tpm:?}");
}

#[test]
fn a_budget_survives_a_restart_of_both_proxies() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let mut c = Cluster::start(&redis, "");
    // 35 tokens: five 7-token requests, three through one proxy and two through the
    // other.
    let key = "sk-budget-0123456789abcd";
    for i in 0..5 {
        let id = format!("b-{i}");
        assert_eq!(call(&c.addr(i % 2), key, &id, false).status, 200);
        wait_record(&c.receiver, &id);
    }
    // Both stop (a clean stop writes the last counts), and start again.
    for p in &mut c.proxies {
        p.signal(libc::SIGTERM);
        assert_eq!(
            p.wait_exit(Duration::from_secs(20)),
            Some(0),
            "{}",
            p.output()
        );
    }
    c.proxies = vec![c.proxy(0), c.proxy(1)];
    // The very first request on each restarted proxy finds the budget spent.
    for i in 0..2 {
        let r = call(&c.addr(i), key, &format!("after-{i}"), false);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "insufficient_quota");
    }
    // Other keys are untouched.
    assert_eq!(
        call(&c.addr(0), "sk-free-0123456789abcdef", "free", false).status,
        200
    );
}

#[test]
fn redis_killed_under_load_both_proxies_keep_serving_and_enforcement_resumes() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let c = Cluster::start(&redis, "");
    // A third proxy that fails closed.
    let closed_cfg = c.config.with_file_name("closed.yaml");
    std::fs::write(
        &closed_cfg,
        config_text(&redis, &c.mock, &c.receiver, "limits_fail_closed: true\n"),
    )
    .unwrap();
    let mut cmd = Command::new(proxy_bin());
    cmd.arg("--config")
        .arg(&closed_cfg)
        .current_dir(closed_cfg.parent().unwrap());
    let closed = spawn(cmd);
    with_minute_left(40);

    // Steady load on both proxies for the whole test: every request must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..2)
        .map(|i| {
            let (addr, stop, sent) = (c.addr(i), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                while !stop.load(Relaxed) {
                    let n = sent.fetch_add(1, Relaxed);
                    let r = call(
                        &addr,
                        "sk-free-0123456789abcdef",
                        &format!("load-{n}"),
                        n % 3 == 0,
                    );
                    if r.status != 200 {
                        failed.push((n, r.status, r.text()));
                    }
                }
                failed
            })
        })
        .collect();

    // 8 of the rpm key's 10 used, 4 through each proxy.
    let before = c.paced("sk-rpm-0123456789abcdef", 8, "pre");
    assert_eq!(ok(&before), 8);
    let served_before = sent.load(Relaxed);

    redis.kill();
    wait_until("both proxies see the store down", 10, || {
        c.store_up(0) == 0.0 && c.store_up(1) == 0.0
    });
    assert!(metric(&c.addr(0), "llmproxy_limits_sync_failures_total") >= 1.0);
    // Fail closed: limited keys refused with a 503 (unlimited ones would pass).
    wait_until("the fail-closed proxy sees the store down", 10, || {
        metric(&closed.addr, "llmproxy_limits_store_up") == 0.0
    });
    let r = call(&closed.addr, "sk-rpm-0123456789abcdef", "closed", false);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "limits_unavailable");
    // Serving goes on meanwhile.
    let during = sent.load(Relaxed);
    wait_until("requests served with the store down", 10, || {
        sent.load(Relaxed) > during + 20
    });

    // Back, empty: the proxies write their counts again, so the key's 8 of 10 stand
    // and only 2 more pass (not 10 - 4 = 6 on each proxy).
    redis.run();
    wait_until("both proxies resynced", 10, || {
        c.store_up(0) == 1.0 && c.store_up(1) == 1.0
    });
    c.synced(0); // both wrote their counts again
    c.synced(1);
    let after = c.paced("sk-rpm-0123456789abcdef", 6, "post");
    assert_eq!(
        after,
        vec![200, 200, 429, 429, 429, 429],
        "after the restart"
    );
    wait_until("the fail-closed proxy resynced", 10, || {
        metric(&closed.addr, "llmproxy_limits_store_up") == 1.0
    });
    assert_eq!(
        call(&closed.addr, "sk-free-0123456789abcdef", "closed-ok", false).status,
        200
    );

    stop.store(true, Relaxed);
    for h in load {
        let failed = h.join().unwrap();
        assert!(
            failed.is_empty(),
            "failed under load: {:?}",
            &failed[..failed.len().min(3)]
        );
    }
    assert!(sent.load(Relaxed) > served_before + 50, "too little load");
    // Logged once per outage, not per failed sync.
    let log = c.proxies[0].output();
    assert_eq!(log.matches("unreachable").count(), 1, "{log}");
    assert_eq!(log.matches("reachable again").count(), 1, "{log}");
}
