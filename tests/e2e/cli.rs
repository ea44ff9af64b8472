//! The command line: --version, --check, and config errors that name the key.

use crate::harness::*;
use std::process::Command;

pub fn run_with(yaml: &str, extra: &[&str]) -> (i32, String, String) {
    let dir = temp_dir();
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(proxy_bin())
        .arg("--config")
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_config_and_hides_secrets() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")).unwrap();
    let (code, out, err) = run_with(&shipped, &["--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is valid"));
    let secret = "listen: \":8080\"\nbackends:\n  - url: http://127.0.0.1:1\n    api_key: sk-backend-secret\nusage_hook:\n  enabled: true\n  url: https://u:pw-secret@bill.example/x?token=tok-secret\n  headers:\n    Authorization: Bearer hook-secret\nauth:\n  enabled: true\n  keys:\n    - key: sk-caller-secret\n      user_id: a\n";
    let (code, out, _) = run_with(secret, &["--check"]);
    assert_eq!(code, 0);
    for s in [
        "sk-backend-secret",
        "pw-secret",
        "tok-secret",
        "hook-secret",
        "sk-caller-secret",
    ] {
        assert!(!out.contains(s), "--check printed a secret: {out}");
    }
}

#[test]
fn the_original_example_loads_unchanged() {
    let original = "listen: \":8080\"\nbackends:\n  - url: \"http://localhost:8000\"\n    weight: 5\n  - url: \"http://localhost:8081\"\n    weight: 3\nusage_hook:\n  enabled: true\n  url: \"https://your-billing.com/llm-usage\"\n  timeout: 1s\n  retry: 2\nhealth_check:\n  interval: 10s\n  path: /health\n";
    let (code, out, err) = run_with(original, &["--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("weight=5"));
}

#[test]
fn invalid_configs_exit_2_naming_the_key() {
    let base = "backends:\n  - url: \"http://localhost:8000\"\nusage_hook:\n  enabled: true\n  url: \"http://x/y\"\n  timeout: fast\n";
    let (code, _, err) = run_with(base, &["--check"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("usage_hook.timeout: expected a duration like \"1s\", got \"fast\""),
        "{err}"
    );
    let (code, _, err) = run_with("backends: []\nsurprise: 1\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("surprise"), "{err}");
    let (code, _, err) = run_with("backends:\n  - url: \"ftp://x\"\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("backends[0].url"), "{err}");
    let one = "backends:\n  - url: \"http://localhost:8000\"\n";
    let (code, _, err) = run_with(
        &format!("{one}limits_store: \"rediss://:hunter2@cache:6380/0\"\n"),
        &["--check"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("limits_store: expected redis://"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the password is never printed: {err}"
    );
    let (code, _, err) = run_with(&format!("{one}limits_fail_closed: true\n"), &["--check"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("limits_fail_closed: needs limits_store"),
        "{err}"
    );
    let (code, _, err) = run_with(
        &format!("{one}limits_store: \"redis://127.0.0.1:6379\"\nlimits_sync_interval: 1ms\n"),
        &["--check"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("limits_sync_interval"), "{err}");
    let (code, out, _) = run_with(
        &format!("{one}limits_store: \"redis://:hunter2@127.0.0.1:6379/2\"\n"),
        &["--check"],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("limits_store: redis://127.0.0.1:6379/2 sync every 100ms fail_open"),
        "{out}"
    );
    assert!(!out.contains("hunter2"));
}

#[test]
fn version() {
    let out = Command::new(proxy_bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("llmproxy "));
}

/// The CPUs `pid`'s threads named `worker-*` may run on, from /proc.
fn worker_cpus(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with("worker-") {
            continue;
        }
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push(cpus);
    }
    out
}

#[test]
fn workers_stay_inside_the_cpus_the_process_may_use() {
    // The last CPU this test may use: under `taskset -c N`, `workers: 0` starts one
    // worker, pinned to N (not to CPU 0, outside the set the operator allowed).
    let allowed = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:").map(str::to_owned))
        .unwrap();
    let last = allowed
        .trim()
        .rsplit([',', '-'])
        .next()
        .unwrap()
        .to_string();
    let dir = temp_dir();
    // The proxy with `workers: N`, started under `taskset -c <last>`.
    let start = |workers: usize| {
        let path = dir.join(format!("config-{workers}.yaml"));
        std::fs::write(
            &path,
            format!("listen: \"127.0.0.1:0\"\nworkers: {workers}\nbackends:\n  - url: \"http://127.0.0.1:1\"\n"),
        )
        .unwrap();
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &last])
            .arg(proxy_bin())
            .arg("--config")
            .arg(&path)
            .current_dir(&dir);
        spawn(cmd)
    };
    let p = start(0);
    assert!(p.output().contains("(1 workers on CPUs "), "{}", p.output());
    wait_until("the worker thread", 5, || {
        !worker_cpus(p.child.id()).is_empty()
    });
    assert_eq!(worker_cpus(p.child.id()), std::slice::from_ref(&last));
    // Two workers asked for on one allowed CPU: both on it.
    let p = start(2);
    wait_until("two worker threads", 5, || {
        worker_cpus(p.child.id()).len() == 2
    });
    assert_eq!(worker_cpus(p.child.id()), [last.clone(), last]);
}
