//! Backends: their shared state (health, in-flight counts), per-worker balancing and
//! connection pools, and the health checker.

pub mod health;
pub mod pool;

use crate::config::{Config, Models, UsageMode, backend_url};
use crate::metrics::{Metrics, WorkerMetrics};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex};

/// A configured backend, shared by all workers. Health is an atomic so every worker
/// sees a change at once; `last_error` is only written on failures and read by /health.
/// A reload that leaves a backend's settings unchanged keeps the same `Backend`, so its
/// health and in-flight count carry over.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub url: Arc<str>,
    /// `host:port`, sent as the upstream Host header.
    pub authority: String,
    pub addrs: Vec<SocketAddr>,
    pub weight: u32,
    pub models: Models,
    /// With `models: auto`: what the backend's `/v1/models` listed last (health thread
    /// writes; workers copy it when `discovered_version` moves, never on each request).
    discovered: Mutex<Option<Arc<[String]>>>,
    discovered_version: AtomicU64,
    /// `Bearer <api_key>` when the backend has a key: the `authorization` value sent.
    pub authorization: Option<String>,
    /// `https://` backends: the TLS client configuration and the name to verify.
    pub tls: Option<crate::tls::Client>,
    /// `(ca_file, tls_insecure_skip_verify)` as configured (a reload compares them).
    pub(crate) tls_settings: (Option<String>, bool),
    pub usage_mode: UsageMode,
    /// Label slot in `llmproxy_requests_total`.
    pub slot: usize,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Passed and failed health checks in a row (health-check thread only).
    pub(crate) streak_ok: AtomicU32,
    pub(crate) streak_fail: AtomicU32,
}

impl Backend {
    /// The backends of `cfg`, reusing those of `old` whose settings did not change.
    pub fn build(
        cfg: &Config,
        old: &[Arc<Backend>],
        metrics: &Metrics,
    ) -> Result<Vec<Arc<Backend>>, String> {
        cfg.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let url = backend_url(&b.url).map_err(|e| format!("backends[{i}].url: {e}"))?;
                let name = b.name.clone().unwrap_or_else(|| url.authority.clone());
                let full = Arc::<str>::from(b.url.trim_end_matches('/'));
                if let Some(same) = old.iter().find(|o| {
                    o.name == name
                        && o.url == full
                        && o.weight == b.weight
                        && o.models == b.models
                        && o.authorization == bearer(&b.api_key)
                        && o.usage_mode == b.usage_mode
                        && o.tls_settings == (b.ca_file.clone(), b.tls_insecure_skip_verify)
                }) {
                    return Ok(same.clone());
                }
                let tls = if url.scheme == "https" {
                    if b.tls_insecure_skip_verify {
                        log::warn!(
                            "backend {name}: tls_insecure_skip_verify is set: its certificate is not verified, so anyone on the path can pose as it"
                        );
                    }
                    Some(
                        crate::tls::client(&url.host, b.ca_file.as_deref(), b.tls_insecure_skip_verify)
                            .map_err(|e| format!("backends[{i}]: {e}"))?,
                    )
                } else {
                    None
                };
                let addrs = url
                    .resolve()
                    .map_err(|e| format!("backends[{i}].url: cannot resolve {}: {e}", url.host))?;
                // A changed backend at the same URL keeps its known health.
                let healthy = old
                    .iter()
                    .find(|o| o.url == full)
                    .is_none_or(|o| o.is_healthy());
                Ok(Arc::new(Backend {
                    slot: metrics.slot(&name),
                    name,
                    url: full,
                    authority: url.authority,
                    addrs,
                    weight: b.weight,
                    models: b.models.clone(),
                    discovered: Mutex::new(None),
                    discovered_version: AtomicU64::new(0),
                    authorization: bearer(&b.api_key),
                    tls,
                    tls_settings: (b.ca_file.clone(), b.tls_insecure_skip_verify),
                    usage_mode: b.usage_mode,
                    healthy: AtomicBool::new(healthy),
                    last_error: Mutex::new(None),
                    streak_ok: AtomicU32::new(0),
                    streak_fail: AtomicU32::new(0),
                }))
            })
            .collect()
    }

    /// Records the models a `models: auto` backend listed; true if they changed.
    pub fn set_discovered(&self, mut models: Vec<String>) -> bool {
        models.sort();
        models.dedup();
        let Ok(mut d) = self.discovered.lock() else {
            return false;
        };
        if d.as_deref() == Some(&models[..]) {
            return false;
        }
        *d = Some(models.into());
        self.discovered_version.fetch_add(1, Release);
        true
    }

    fn discovered(&self) -> Option<Arc<[String]>> {
        self.discovered.lock().ok().and_then(|d| d.clone())
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    pub fn set_health(&self, healthy: bool, error: Option<String>) {
        self.healthy.store(healthy, Relaxed);
        if !healthy {
            // Coming back takes `healthy_after` passed checks from now.
            self.streak_ok.store(0, Relaxed);
        }
        // try_lock: a worker reporting a failure never waits on /health readers.
        if let Ok(mut e) = self.last_error.try_lock()
            && (error.is_some() || healthy)
        {
            *e = error;
        }
    }
}

/// One worker's view of the backends: its own in-flight counts and round-robin state,
/// in `Cell`s because only this worker's thread touches them.
pub struct Upstreams {
    pub backends: Arc<[Arc<Backend>]>,
    local: Vec<LocalBackend>,
    pub pool: pool::Pool,
}

#[derive(Default)]
struct LocalBackend {
    in_flight: Cell<u32>,
    current: Cell<i64>,
    /// This worker's copy of a `models: auto` backend's list, and its version.
    models: std::cell::RefCell<Option<Arc<[String]>>>,
    models_version: Cell<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Backend(usize),
    /// No backend lists the model.
    NoModel,
    /// Backends serve the model, but every one was tried or excluded.
    Exhausted,
}

impl Upstreams {
    /// A worker's view of `backends`; idle connections of `previous` (the view before a
    /// reload) to backends that stay are carried over.
    pub fn new(backends: Arc<[Arc<Backend>]>, previous: Option<&Upstreams>) -> Self {
        let n = backends.len();
        let pool = pool::Pool::new(n);
        if let Some(prev) = previous {
            for (i, b) in backends.iter().enumerate() {
                if let Some(j) = prev.backends.iter().position(|o| Arc::ptr_eq(o, b)) {
                    for (io, since) in prev.pool.drain(j) {
                        pool.put_idle(i, io, since);
                    }
                }
            }
        }
        Upstreams {
            local: (0..n).map(|_| LocalBackend::default()).collect(),
            pool,
            backends,
        }
    }

    /// Whether backend `i` serves `model`. A `models: auto` backend whose list is not
    /// known yet (never answered) is taken to serve any model, so a backend that is down
    /// at start gives 502, not 404.
    fn serves(&self, i: usize, model: &str) -> bool {
        let b = &self.backends[i];
        match &b.models {
            Models::Any => true,
            Models::List(list) => list.iter().any(|m| m == model),
            Models::Auto => {
                let l = &self.local[i];
                let version = b.discovered_version.load(Acquire);
                if l.models_version.get() != version {
                    *l.models.borrow_mut() = b.discovered();
                    l.models_version.set(version);
                }
                l.models
                    .borrow()
                    .as_ref()
                    .is_none_or(|list| list.iter().any(|m| m == model))
            }
        }
    }

    /// Weighted least-outstanding-requests: the lowest in-flight/weight among healthy
    /// backends serving `model`; ties go by smooth weighted round robin, so idle
    /// backends share traffic in proportion to weight. When no serving backend is
    /// healthy, the unhealthy ones are tried rather than failing without an attempt
    /// (a refused connection then answers quickly). `tried` marks backends already
    /// attempted for this request.
    ///
    /// In-flight counts are per worker: each worker balances its own share, which with
    /// SO_REUSEPORT spreading connections evenly is close to the global balance and
    /// needs no cross-core traffic on the hot path.
    pub fn pick(&self, model: Option<&str>, tried: u64) -> Pick {
        let serving = |i: usize| model.is_none_or(|m| self.serves(i, m));
        if !(0..self.backends.len()).any(serving) {
            return Pick::NoModel;
        }
        let untried = |i: usize| tried & (1 << i.min(63)) == 0 && serving(i);
        let any_healthy =
            (0..self.backends.len()).any(|i| untried(i) && self.backends[i].is_healthy());
        let eligible = |i: usize| untried(i) && (!any_healthy || self.backends[i].is_healthy());
        // Lowest in_flight/weight, compared by cross-multiplying.
        let mut best: Option<(u64, u64)> = None;
        for i in (0..self.backends.len()).filter(|&i| eligible(i)) {
            let load = (
                self.local[i].in_flight.get() as u64,
                self.backends[i].weight as u64,
            );
            if best.is_none_or(|(f, w)| load.0 * w < f * load.1) {
                best = Some(load);
            }
        }
        let Some((bf, bw)) = best else {
            return Pick::Exhausted;
        };
        let tied = |i: usize| {
            eligible(i)
                && self.local[i].in_flight.get() as u64 * bw == bf * self.backends[i].weight as u64
        };
        let mut total = 0i64;
        let mut chosen: Option<usize> = None;
        for i in (0..self.backends.len()).filter(|&i| tied(i)) {
            let l = &self.local[i];
            l.current
                .set(l.current.get() + self.backends[i].weight as i64);
            total += self.backends[i].weight as i64;
            if chosen.is_none_or(|c| l.current.get() > self.local[c].current.get()) {
                chosen = Some(i);
            }
        }
        match chosen {
            Some(c) => {
                let l = &self.local[c];
                l.current.set(l.current.get() - total);
                Pick::Backend(c)
            }
            None => Pick::Exhausted,
        }
    }

    /// Marks a request in flight on backend `i` until the guard drops: in this
    /// worker's balancing, and in its metrics shard for the gauge.
    pub fn start<'a>(&'a self, i: usize, stats: &'a WorkerMetrics) -> InFlight<'a> {
        self.local[i]
            .in_flight
            .set(self.local[i].in_flight.get() + 1);
        stats.backend_started(self.backends[i].slot);
        InFlight {
            up: self,
            index: i,
            stats,
        }
    }
}

pub struct InFlight<'a> {
    up: &'a Upstreams,
    index: usize,
    stats: &'a WorkerMetrics,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let l = &self.up.local[self.index];
        l.in_flight.set(l.in_flight.get().saturating_sub(1));
        self.stats.backend_done(self.up.backends[self.index].slot);
    }
}

/// A backend key as the `authorization` header's value.
fn bearer(api_key: &Option<String>) -> Option<String> {
    api_key.as_ref().map(|k| format!("Bearer {k}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ups(spec: &[(u32, &[&str])]) -> Upstreams {
        let backends: Vec<Arc<Backend>> = spec
            .iter()
            .enumerate()
            .map(|(i, (w, models))| {
                Arc::new(Backend {
                    name: format!("b{i}"),
                    url: Arc::from("http://x"),
                    authority: "x".into(),
                    addrs: vec![],
                    weight: *w,
                    models: if models.is_empty() {
                        Models::Any
                    } else {
                        Models::List(models.iter().map(|s| s.to_string()).collect())
                    },
                    discovered: Mutex::new(None),
                    discovered_version: AtomicU64::new(0),
                    authorization: None,
                    tls: None,
                    tls_settings: (None, false),
                    usage_mode: UsageMode::Final,
                    slot: i + 1,
                    healthy: AtomicBool::new(true),
                    last_error: Mutex::new(None),
                    streak_ok: AtomicU32::new(0),
                    streak_fail: AtomicU32::new(0),
                })
            })
            .collect();
        Upstreams::new(backends.into(), None)
    }

    #[test]
    fn idle_backends_share_by_weight() {
        let u = ups(&[(5, &[]), (3, &[])]);
        let mut counts = [0; 2];
        for _ in 0..80 {
            let Pick::Backend(i) = u.pick(Some("m"), 0) else {
                panic!()
            };
            counts[i] += 1;
        }
        assert_eq!(counts, [50, 30]);
    }

    #[test]
    fn least_loaded_wins() {
        let u = ups(&[(1, &[]), (1, &[])]);
        let m = Arc::new(Metrics::new(1));
        let stats = m.claim(0).expect("shard");
        let _a = u.start(0, &stats);
        let _b = u.start(0, &stats);
        assert_eq!(m.in_flight(u.backends[0].slot), 2);
        assert_eq!(u.pick(None, 0), Pick::Backend(1));
        assert_eq!(u.pick(None, 0b10), Pick::Backend(0));
        assert_eq!(u.pick(None, 0b11), Pick::Exhausted);
    }

    #[test]
    fn routes_by_model_and_health() {
        let u = ups(&[(1, &["a"]), (1, &["b"]), (1, &["b"])]);
        assert_eq!(u.pick(Some("a"), 0), Pick::Backend(0));
        assert_eq!(u.pick(Some("zzz"), 0), Pick::NoModel);
        u.backends[1].set_health(false, Some("down".into()));
        for _ in 0..5 {
            assert_eq!(u.pick(Some("b"), 0), Pick::Backend(2));
        }
        u.backends[2].set_health(false, None);
        // Nothing healthy: try the unhealthy rather than refuse without an attempt.
        assert!(matches!(u.pick(Some("b"), 0), Pick::Backend(1 | 2)));
        assert_eq!(u.backends[1].last_error().as_deref(), Some("down"));
    }
}
