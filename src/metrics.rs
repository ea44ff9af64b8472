//! Prometheus metrics. Every counter is an atomic written with `Relaxed` ordering:
//! workers on different cores only ever add, and a scrape needs no consistent snapshot.
//! `llmproxy_requests_total` is an array per backend label, indexed by (path, stream,
//! status), so counting a request never allocates or locks. Backend labels get a slot
//! when a backend is configured (at start or on reload); a slot's array is allocated
//! on its first request.

use crate::upstream::Backend;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Path label values: the API's own paths, everything else folded so label
/// cardinality stays bounded whatever callers send.
pub const PATHS: [&str; 8] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/other",
    "/health",
    "/metrics",
    "other",
];

pub fn path_index(route: &str) -> usize {
    match route {
        "/v1/chat/completions" => 0,
        "/v1/completions" => 1,
        "/v1/embeddings" => 2,
        "/v1/models" => 3,
        "/health" => 5,
        "/metrics" => 6,
        r if r.starts_with("/v1/") => 4,
        _ => 7,
    }
}

const STATUSES: usize = 500; // 100..=599
/// Backend label slots, slot 0 being `none` (the proxy answered itself). Reloads that
/// bring more distinct backend names than this share the last slot's label.
pub const MAX_BACKEND_SLOTS: usize = 256;
const PER_SLOT: usize = PATHS.len() * 2 * STATUSES;

pub struct Histogram {
    /// Upper bounds in microseconds.
    bounds: &'static [u64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe_us(&self, us: u64) {
        let i = self.bounds.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1000.0);
        }
        cum += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

const MS_BUCKETS: &[u64] = &[
    1_000,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
];
const OVERHEAD_BUCKETS: &[u64] = &[
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
];

pub struct Metrics {
    /// Label of each slot; only locked when a backend is configured and at scrape.
    slot_names: std::sync::Mutex<Vec<String>>,
    requests: Vec<std::sync::OnceLock<Box<[AtomicU64]>>>,
    pub latency: Histogram,
    pub ttft: Histogram,
    pub overhead: Histogram,
    pub webhook_success: AtomicU64,
    pub webhook_failure: AtomicU64,
    pub webhook_retries: AtomicU64,
    pub records_emitted: AtomicU64,
    pub records_dropped: AtomicU64,
    pub dead_letter: AtomicU64,
    pub tokens_prompt: AtomicU64,
    pub tokens_completion: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub spooled: AtomicU64,
    pub redelivered: AtomicU64,
    pub access_log_dropped: AtomicU64,
    /// The spool's own counters, once a spool is open (read at scrape time).
    pub spool: std::sync::OnceLock<Arc<crate::delivery::spool::Shared>>,
    /// Arrival (unix ms) of the oldest record waiting in the spool; 0 when none.
    pub spool_oldest_ms: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let zero = || AtomicU64::new(0);
        Metrics {
            requests: (0..MAX_BACKEND_SLOTS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            slot_names: std::sync::Mutex::new(vec!["none".to_string()]),
            latency: Histogram::new(MS_BUCKETS),
            ttft: Histogram::new(MS_BUCKETS),
            overhead: Histogram::new(OVERHEAD_BUCKETS),
            webhook_success: zero(),
            webhook_failure: zero(),
            webhook_retries: zero(),
            records_emitted: zero(),
            records_dropped: zero(),
            dead_letter: zero(),
            tokens_prompt: zero(),
            tokens_completion: zero(),
            connections_open: zero(),
            connections_rejected: zero(),
            spooled: zero(),
            redelivered: zero(),
            access_log_dropped: zero(),
            spool: std::sync::OnceLock::new(),
            spool_oldest_ms: zero(),
        }
    }

    /// The label slot for a backend name (the same name keeps its slot across reloads).
    pub fn slot(&self, name: &str) -> usize {
        let Ok(mut names) = self.slot_names.lock() else {
            return 0;
        };
        if let Some(i) = names.iter().position(|n| n == name) {
            return i;
        }
        if names.len() < MAX_BACKEND_SLOTS {
            names.push(name.to_string());
        }
        names.len() - 1
    }

    /// Counts one answered request. `slot`: the backend's label slot, `None` when the
    /// proxy answered itself.
    pub fn count_request(&self, path: usize, stream: bool, slot: Option<usize>, status: u16) {
        let b = slot.unwrap_or(0).min(MAX_BACKEND_SLOTS - 1);
        let s = (status.clamp(100, 599) - 100) as usize;
        let i = (path * 2 + stream as usize) * STATUSES + s;
        let counters =
            self.requests[b].get_or_init(|| (0..PER_SLOT).map(|_| AtomicU64::new(0)).collect());
        if let Some(c) = counters.get(i) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn render(&self, backends: &[Arc<Backend>], queue_depth: usize) -> String {
        let mut o = String::with_capacity(8192);
        let names = self
            .slot_names
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "# HELP llmproxy_requests_total Requests answered, by path, stream, backend and status.\n# TYPE llmproxy_requests_total counter"
        );
        for (slot, counters) in self.requests.iter().enumerate() {
            let Some(counters) = counters.get() else {
                continue;
            };
            let backend = names.get(slot).map_or("other", String::as_str);
            for (i, c) in counters.iter().enumerate() {
                let v = c.load(Relaxed);
                if v == 0 {
                    continue;
                }
                let status = i % STATUSES + 100;
                let stream = (i / STATUSES) % 2 == 1;
                let path = PATHS[i / STATUSES / 2];
                let _ = writeln!(
                    o,
                    "llmproxy_requests_total{{path=\"{path}\",stream=\"{stream}\",backend=\"{backend}\",status=\"{status}\"}} {v}"
                );
            }
        }
        self.latency.render(
            &mut o,
            "llmproxy_latency_ms",
            "Request duration from arrival to the last byte sent, in ms.",
        );
        self.ttft.render(&mut o, "llmproxy_ttft_ms", "Time to first token of streams, from arrival to the first output event forwarded, in ms.");
        self.overhead.render(
            &mut o,
            "llmproxy_proxy_overhead_ms",
            "Time spent in the proxy itself, not waiting for the backend, in ms.",
        );
        let backlog = AtomicU64::new(
            self.spool
                .get()
                .map_or(0, |s| s.backlog_bytes.load(Relaxed)),
        );
        let counters: [(&str, &str, &AtomicU64); 12] = [
            (
                "llmproxy_access_log_dropped_total",
                "Access log lines dropped because the log writer fell behind.",
                &self.access_log_dropped,
            ),
            (
                "llmproxy_usage_spooled_total",
                "Usage records written to the durable spool.",
                &self.spooled,
            ),
            (
                "llmproxy_usage_redelivered_total",
                "Usage records delivered from the spool backlog after a webhook outage or a restart.",
                &self.redelivered,
            ),
            (
                "llmproxy_usage_spool_bytes",
                "Bytes of spooled records not yet delivered.",
                &backlog,
            ),
            (
                "llmproxy_webhook_success_total",
                "Usage records delivered to the webhook.",
                &self.webhook_success,
            ),
            (
                "llmproxy_webhook_failure_total",
                "Usage records the webhook did not accept after all retries.",
                &self.webhook_failure,
            ),
            (
                "llmproxy_webhook_retries_total",
                "Webhook POSTs retried.",
                &self.webhook_retries,
            ),
            (
                "llmproxy_usage_records_total",
                "Usage records produced.",
                &self.records_emitted,
            ),
            (
                "llmproxy_usage_dropped_total",
                "Usage records that could not be queued for delivery.",
                &self.records_dropped,
            ),
            (
                "llmproxy_usage_dead_letter_total",
                "Usage records permanently refused by the webhook.",
                &self.dead_letter,
            ),
            (
                "llmproxy_connections_rejected_total",
                "Connections refused over limits.max_connections.",
                &self.connections_rejected,
            ),
            (
                "llmproxy_connections_open",
                "Client connections open.",
                &self.connections_open,
            ),
        ];
        for (name, help, c) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                c.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP llmproxy_usage_tokens_total Tokens billed, from usage records.\n# TYPE llmproxy_usage_tokens_total counter"
        );
        let _ = writeln!(
            o,
            "llmproxy_usage_tokens_total{{type=\"prompt\"}} {}",
            self.tokens_prompt.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "llmproxy_usage_tokens_total{{type=\"completion\"}} {}",
            self.tokens_completion.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP llmproxy_usage_queue_depth Usage records waiting for delivery.\n# TYPE llmproxy_usage_queue_depth gauge\nllmproxy_usage_queue_depth {queue_depth}"
        );
        let _ = writeln!(
            o,
            "# HELP llmproxy_backend_up Whether the backend is healthy (1) or not (0).\n# TYPE llmproxy_backend_up gauge"
        );
        for b in backends {
            let _ = writeln!(
                o,
                "llmproxy_backend_up{{backend=\"{}\"}} {}",
                b.name,
                b.is_healthy() as u8
            );
        }
        let _ = writeln!(
            o,
            "# HELP llmproxy_backend_in_flight Requests in flight per backend.\n# TYPE llmproxy_backend_in_flight gauge"
        );
        for b in backends {
            let _ = writeln!(
                o,
                "llmproxy_backend_in_flight{{backend=\"{}\"}} {}",
                b.name,
                b.in_flight()
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counter_labels_round_trip() {
        let m = Metrics::new();
        let (_a, b) = (m.slot("a"), m.slot("b"));
        assert_eq!(m.slot("b"), b);
        m.count_request(0, true, Some(b), 200);
        m.count_request(7, false, None, 401);
        m.count_request(7, false, None, 401);
        let text = m.render(&[], 0);
        assert!(text.contains("llmproxy_requests_total{path=\"/v1/chat/completions\",stream=\"true\",backend=\"b\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("llmproxy_requests_total{path=\"other\",stream=\"false\",backend=\"none\",status=\"401\"} 2"));
        assert!(text.contains("llmproxy_webhook_success_total 0"));
    }

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(MS_BUCKETS);
        h.observe_us(500);
        h.observe_us(7_000);
        h.observe_us(999_000_000);
        let mut o = String::new();
        h.render(&mut o, "x", "x");
        assert!(o.contains("x_bucket{le=\"1\"} 1\n"));
        assert!(o.contains("x_bucket{le=\"10\"} 2\n"));
        assert!(o.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(o.contains("x_count 3\n"));
    }
}
