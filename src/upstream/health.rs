//! Active health checks, from one thread for all workers: every `interval`, GET
//! `path` on each backend; `unhealthy_after` failures in a row mark it down,
//! `healthy_after` passes mark it up. Workers read the result from an atomic.

use super::Backend;
use crate::config::HealthCheckConfig;
use crate::{info, warn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub struct HealthChecker {
    backends: Arc<[Arc<Backend>]>,
    cfg: HealthCheckConfig,
    agent: ureq::Agent,
    streaks: Vec<(u32, u32)>,
}

impl HealthChecker {
    pub fn new(
        backends: Arc<[Arc<Backend>]>,
        cfg: HealthCheckConfig,
        connect_timeout: Duration,
    ) -> Self {
        let timeout = cfg.interval.0.min(Duration::from_secs(5));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(connect_timeout.min(timeout)))
            .http_status_as_error(false)
            .build()
            .into();
        let n = backends.len();
        HealthChecker {
            backends,
            cfg,
            agent,
            streaks: vec![(0, 0); n],
        }
    }

    fn probe(&self, b: &Backend) -> Result<(), String> {
        let url = format!("{}{}", b.url, self.cfg.path);
        match self.agent.get(&url).call() {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!(
                "health check {} answered {}",
                self.cfg.path,
                resp.status().as_u16()
            )),
            Err(e) => Err(format!("health check failed: {e}")),
        }
    }

    /// The check at start: its result is taken as is, with no streak needed.
    pub fn check_once(&mut self) {
        for b in self.backends.iter() {
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
        for i in 0..self.backends.len() {
            let b = self.backends[i].clone();
            let result = self.probe(&b);
            let (ok, fail) = &mut self.streaks[i];
            match result {
                Ok(()) => {
                    *ok += 1;
                    *fail = 0;
                    if !b.is_healthy() && *ok >= self.cfg.healthy_after {
                        b.set_health(true, None);
                        info!("backend {} ({}) is healthy again", b.name, b.url);
                    }
                }
                Err(e) => {
                    *fail += 1;
                    *ok = 0;
                    if b.is_healthy() && *fail >= self.cfg.unhealthy_after {
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
