//! Active health checks, from one thread for all workers: every `interval`, GET
//! `path` on each backend; `unhealthy_after` failures in a row mark it down,
//! `healthy_after` passes mark it up. Workers read the result from an atomic.

use super::Backend;
use crate::config::HealthCheckConfig;
use crate::config::Models;
use log::{info, warn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Where the checker finds the current backends (they change on reload).
pub type BackendSource = Box<dyn Fn() -> Arc<[Arc<Backend>]> + Send>;

pub struct HealthChecker {
    backends: BackendSource,
    cfg: HealthCheckConfig,
    agent: ureq::Agent,
    timeouts: (Duration, Duration),
}

impl HealthChecker {
    pub fn new(backends: BackendSource, cfg: HealthCheckConfig, connect_timeout: Duration) -> Self {
        let timeout = cfg.interval.0.min(Duration::from_secs(5));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(connect_timeout.min(timeout)))
            .http_status_as_error(false)
            .build()
            .into();
        HealthChecker {
            backends,
            cfg,
            agent,
            timeouts: (timeout, connect_timeout.min(timeout)),
        }
    }

    /// The client for `b`: the shared one (plain http, or https verified against the
    /// Mozilla roots, as the workers do), or one with `b`'s own `ca_file` or
    /// `tls_insecure_skip_verify`.
    fn agent_for(&self, b: &Backend) -> std::borrow::Cow<'_, ureq::Agent> {
        use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
        let (ca_file, insecure) = &b.tls_settings;
        if ca_file.is_none() && !insecure {
            return std::borrow::Cow::Borrowed(&self.agent);
        }
        let mut tls = TlsConfig::builder().disable_verification(*insecure);
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).unwrap_or_default();
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        std::borrow::Cow::Owned(
            ureq::Agent::config_builder()
                .timeout_global(Some(self.timeouts.0))
                .timeout_connect(Some(self.timeouts.1))
                .http_status_as_error(false)
                .tls_config(tls.build())
                .build()
                .into(),
        )
    }

    fn probe(&self, b: &Backend) -> Result<(), String> {
        let url = format!("{}{}", b.url, self.cfg.path);
        match self.agent_for(b).get(&url).call() {
            Ok(resp) if resp.status().is_success() => {
                if b.models == Models::Auto {
                    self.discover(b);
                }
                Ok(())
            }
            Ok(resp) => Err(format!(
                "health check {} answered {}",
                self.cfg.path,
                resp.status().as_u16()
            )),
            Err(e) => Err(format!("health check failed: {e}")),
        }
    }

    /// `models: auto`: the backend's own model list (a LoRA adapter added to vLLM is
    /// routed at the next check, with no config change).
    fn discover(&self, b: &Backend) {
        let agent = self.agent_for(b);
        let mut req = agent.get(format!("{}/v1/models", b.url));
        if let Some(a) = &b.authorization {
            req = req.header("authorization", a);
        }
        let ids = req
            .call()
            .ok()
            .filter(|r| r.status().is_success())
            .and_then(|r| {
                r.into_body()
                    .with_config()
                    .limit(8 << 20)
                    .read_to_vec()
                    .ok()
            })
            .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
            .and_then(|v| {
                v.get("data")?.as_array().map(|list| {
                    list.iter()
                        .filter_map(|m| m.get("id")?.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
            });
        match ids {
            Some(ids) => {
                let n = ids.len();
                if b.set_discovered(ids) {
                    info!(
                        "backend {}: serves {n} models (discovered from /v1/models)",
                        b.name
                    );
                }
            }
            None => warn!(
                "backend {}: cannot read /v1/models for models: auto",
                b.name
            ),
        }
    }

    /// The check at start: its result is taken as is, with no streak needed.
    pub fn check_once(&mut self) {
        for b in (self.backends)().iter() {
            match self.probe(b) {
                Ok(()) => {
                    b.set_health(true, None);
                    info!("backend {} ({}) is healthy", b.name, b.url);
                }
                Err(e) => {
                    b.set_health(false, Some(e.clone()));
                    warn!("backend {} ({}) is down: {e}", b.name, b.url);
                }
            }
        }
    }

    fn check_round(&mut self) {
        for b in (self.backends)().iter() {
            match self.probe(b) {
                Ok(()) => {
                    let ok = b.streak_ok.fetch_add(1, Relaxed) + 1;
                    b.streak_fail.store(0, Relaxed);
                    if !b.is_healthy() && ok >= self.cfg.healthy_after {
                        b.set_health(true, None);
                        info!("backend {} ({}) is healthy again", b.name, b.url);
                    }
                }
                Err(e) => {
                    let fail = b.streak_fail.fetch_add(1, Relaxed) + 1;
                    b.streak_ok.store(0, Relaxed);
                    if b.is_healthy() && fail >= self.cfg.unhealthy_after {
                        warn!("backend {} ({}) marked down: {e}", b.name, b.url);
                        b.set_health(false, Some(e));
                    } else if !b.is_healthy() {
                        b.set_health(false, Some(e));
                    }
                }
            }
        }
    }

    /// Runs until `stop` is set.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut next = Instant::now() + self.cfg.interval.0;
        while !stop.load(Relaxed) {
            let now = Instant::now();
            if now >= next {
                self.check_round();
                next = Instant::now() + self.cfg.interval.0;
            }
            std::thread::sleep(Duration::from_millis(50).min(next.saturating_duration_since(now)));
        }
    }
}
