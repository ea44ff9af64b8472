//! Prometheus metrics. What a request counts goes to its worker's own `Shard`: a
//! single writer, so an add is a load and a store on cache lines no other core
//! writes, never a locked read-modify-write on a line every worker shares (twelve
//! locked adds cost ~80 ns a request here even on one core, ~320 ns with two workers
//! on two cores taking the lines from each other). A scrape sums the shards; it needs
//! no consistent snapshot. The delivery and log threads' counters (per batch or rare)
//! are plain shared atomics.
//!
//! `llmproxy_requests_total` is a row of counters by status per backend label, path
//! and stream flag, so counting a request never locks and allocates only the first
//! time a worker sees that combination (4 KiB a row). Backend labels get a slot when a
//! backend is configured (at start or on reload).

use std::fmt::Write;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// A backend as the metrics page shows it.
pub struct BackendState<'a> {
    pub name: &'a str,
    pub healthy: bool,
    /// Its label slot (`Metrics::slot`).
    pub slot: usize,
}

/// A label value escaped per the Prometheus text format: backslash, double quote and
/// newline (a backend named with any of them must not break the whole page).
fn label_value(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 4);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

const STATUSES: usize = 500; // 100..=599
/// Backend label slots, slot 0 being `none` (the proxy answered itself) and the last
/// `other`: reloads that bring more distinct backend names than the slots between count
/// them together under `backend="other"`, never under another backend's name.
pub const MAX_BACKEND_SLOTS: usize = 256;
/// The slot of the backends past the named ones.
const OTHER_SLOT: usize = MAX_BACKEND_SLOTS - 1;
/// Rows per backend label slot: one per (path, stream).
/// Path label values come from the route table (`routes::LABELS`): each path of
/// the table, the patterns, `extra` and `other`, so their number is bounded whatever
/// callers send.
fn rows() -> usize {
    crate::routes::LABELS.len() * 2
}
/// A slot's rows, each `STATUSES` counters, allocated on first use.
type Rows = Box<[OnceLock<Box<[Counter]>>]>;

/// A counter one thread writes and any thread reads: `add` and `sub` are a load
/// and a store, so a second writer would lose counts; only a `WorkerMetrics` (not
/// `Send`, one per shard) writes.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    #[inline]
    fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Most buckets a histogram has (its bounds and `+Inf`).
const MAX_BUCKETS: usize = 20;

/// Bucket counts in microseconds, inside its shard (no pointer to a heap block that
/// could share a cache line with another worker's).
struct Histogram {
    /// Upper bounds in microseconds.
    bounds: &'static [u64],
    counts: [Counter; MAX_BUCKETS],
    sum_us: Counter,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Self {
        assert!(
            bounds.len() < MAX_BUCKETS,
            "histogram with too many buckets"
        );
        Histogram {
            bounds,
            counts: Default::default(),
            sum_us: Counter::default(),
        }
    }

    fn observe_us(&self, us: u64) {
        let i = self.bounds.partition_point(|&b| b < us);
        self.counts[i].add(1);
        self.sum_us.add(us);
    }

    /// One histogram made of the same histogram of every shard.
    fn render<'a>(
        parts: impl Iterator<Item = &'a Histogram> + Clone,
        out: &mut String,
        name: &str,
        help: &str,
    ) {
        let Some(first) = parts.clone().next() else {
            return;
        };
        let bounds = first.bounds;
        let count = |i: usize| parts.clone().map(|h| h.counts[i].get()).sum::<u64>();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in bounds.iter().enumerate() {
            cum += count(i);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1000.0);
        }
        cum += count(bounds.len());
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let sum: u64 = parts.map(|h| h.sum_us.get()).sum();
        let _ = writeln!(out, "{name}_sum {}", sum as f64 / 1000.0);
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

/// What one worker counts, written by that worker alone (through its
/// `WorkerMetrics`). Aligned so that two shards never share a cache line.
#[repr(align(128))]
struct Shard {
    /// Handed to a worker already.
    claimed: AtomicBool,
    /// Per backend label slot: a row of counters by status per (path, stream), each
    /// allocated by the worker on its first request.
    requests: Box<[OnceLock<Rows>]>,
    latency: Histogram,
    ttft: Histogram,
    overhead: Histogram,
    records: Counter,
    tokens_prompt: Counter,
    tokens_completion: Counter,
    /// Gauges, added to and taken from by the same worker.
    connections_open: Counter,
    busy: Counter,
    /// Requests in flight per backend label slot.
    in_flight: [Counter; MAX_BACKEND_SLOTS],
}

impl Shard {
    fn new() -> Self {
        Shard {
            claimed: AtomicBool::new(false),
            requests: (0..MAX_BACKEND_SLOTS).map(|_| OnceLock::new()).collect(),
            latency: Histogram::new(MS_BUCKETS),
            ttft: Histogram::new(MS_BUCKETS),
            overhead: Histogram::new(OVERHEAD_BUCKETS),
            records: Counter::default(),
            tokens_prompt: Counter::default(),
            tokens_completion: Counter::default(),
            connections_open: Counter::default(),
            busy: Counter::default(),
            in_flight: std::array::from_fn(|_| Counter::default()),
        }
    }
}

pub struct Metrics {
    /// Label of each slot; only locked when a backend is configured and at scrape.
    slot_names: std::sync::Mutex<Vec<String>>,
    /// One per worker.
    shards: Box<[Shard]>,
    pub webhook_success: AtomicU64,
    pub webhook_failure: AtomicU64,
    pub webhook_retries: AtomicU64,
    pub records_dropped: AtomicU64,
    pub dead_letter: AtomicU64,
    pub connections_rejected: AtomicU64,
    /// Requests refused by a key's limits: rpm, tpm, concurrency, budget, store down.
    pub rate_limited: [AtomicU64; 5],
    /// The shared limits store: 0 none configured, 1 reachable, 2 unreachable.
    pub limits_store: std::sync::atomic::AtomicU8,
    pub limits_sync_failures: AtomicU64,
    pub limits_syncs: AtomicU64,
    /// The listener certificate's expiry (unix seconds); 0 without TLS.
    pub tls_cert_not_after: std::sync::atomic::AtomicI64,
    pub tls_handshake_failures: AtomicU64,
    /// Records taken into the spool: written to a segment, or delivered (or
    /// dead-lettered) straight from a staging ring (`direct`, a part of them).
    pub spooled: AtomicU64,
    pub direct: AtomicU64,
    /// Records workers spooled themselves because the queue was full.
    pub overflowed: AtomicU64,
    pub redelivered: AtomicU64,
    pub access_log_dropped: AtomicU64,
    /// The spool's own counters, once a spool is open (read at scrape time).
    pub spool: OnceLock<Arc<crate::delivery::spool::SpoolState>>,
    /// Arrival (unix ms) of the oldest record waiting in the spool; 0 when none.
    pub spool_oldest_ms: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(1)
    }
}

/// A worker's handle on its shard, the only writer of it. Not `Send`: it stays on
/// the thread that claimed the shard (clones share it there).
#[derive(Clone)]
pub struct WorkerMetrics {
    metrics: Arc<Metrics>,
    shard: usize,
    _one_thread: PhantomData<Rc<()>>,
}

impl WorkerMetrics {
    fn shard(&self) -> &Shard {
        &self.metrics.shards[self.shard]
    }

    /// Counts one answered request. `slot`: the backend's label slot, `None` when the
    /// proxy answered itself.
    pub fn count_request(&self, path: usize, stream: bool, slot: Option<usize>, status: u16) {
        let b = slot.unwrap_or(0).min(OTHER_SLOT);
        let s = (status.clamp(100, 599) - 100) as usize;
        let rows =
            self.shard().requests[b].get_or_init(|| (0..rows()).map(|_| OnceLock::new()).collect());
        let Some(row) = rows.get(path * 2 + stream as usize) else {
            return;
        };
        let counters = row.get_or_init(|| (0..STATUSES).map(|_| Counter::default()).collect());
        if let Some(c) = counters.get(s) {
            c.add(1);
        }
    }

    pub fn latency_us(&self, us: u64) {
        self.shard().latency.observe_us(us);
    }

    pub fn ttft_us(&self, us: u64) {
        self.shard().ttft.observe_us(us);
    }

    pub fn overhead_us(&self, us: u64) {
        self.shard().overhead.observe_us(us);
    }

    /// A usage record produced, with its tokens.
    pub fn record(&self, prompt_tokens: u64, completion_tokens: u64) {
        let s = self.shard();
        s.records.add(1);
        s.tokens_prompt.add(prompt_tokens);
        s.tokens_completion.add(completion_tokens);
    }

    pub fn connection_opened(&self) {
        self.shard().connections_open.add(1);
    }

    pub fn connection_closed(&self) {
        self.shard().connections_open.sub(1);
    }

    /// A request is being handled until `request_done`.
    pub fn request_started(&self) {
        self.shard().busy.add(1);
    }

    pub fn request_done(&self) {
        self.shard().busy.sub(1);
    }

    /// A request went to the backend with label slot `slot` until `backend_done`.
    pub fn backend_started(&self, slot: usize) {
        self.shard().in_flight[slot.min(OTHER_SLOT)].add(1);
    }

    pub fn backend_done(&self, slot: usize) {
        self.shard().in_flight[slot.min(OTHER_SLOT)].sub(1);
    }
}

impl Metrics {
    /// Metrics for `workers` workers (at least one shard).
    pub fn new(workers: usize) -> Self {
        let zero = || AtomicU64::new(0);
        Metrics {
            slot_names: std::sync::Mutex::new(vec!["none".to_string()]),
            shards: (0..workers.max(1)).map(|_| Shard::new()).collect(),
            webhook_success: zero(),
            webhook_failure: zero(),
            webhook_retries: zero(),
            records_dropped: zero(),
            dead_letter: zero(),
            connections_rejected: zero(),
            rate_limited: std::array::from_fn(|_| zero()),
            limits_store: std::sync::atomic::AtomicU8::new(0),
            limits_sync_failures: zero(),
            limits_syncs: zero(),
            tls_cert_not_after: std::sync::atomic::AtomicI64::new(0),
            tls_handshake_failures: zero(),
            spooled: zero(),
            direct: zero(),
            overflowed: zero(),
            redelivered: zero(),
            access_log_dropped: zero(),
            spool: OnceLock::new(),
            spool_oldest_ms: zero(),
        }
    }

    /// Shard `i` for the calling thread to write; `None` if it is out of range or
    /// was claimed before (a second writer would lose counts).
    pub fn claim(self: &Arc<Self>, i: usize) -> Option<WorkerMetrics> {
        let shard = self.shards.get(i)?;
        if shard.claimed.swap(true, Relaxed) {
            return None;
        }
        Some(WorkerMetrics {
            metrics: self.clone(),
            shard: i,
            _one_thread: PhantomData,
        })
    }

    fn sum(&self, f: impl Fn(&Shard) -> &Counter) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |a, s| a.wrapping_add(f(s).get()))
    }

    /// Requests being handled, all workers together.
    pub fn busy(&self) -> u64 {
        self.sum(|s| &s.busy)
    }

    /// Requests in flight to the backends with label slot `slot`, all workers together.
    pub fn in_flight(&self, slot: usize) -> i64 {
        self.sum(|s| &s.in_flight[slot.min(OTHER_SLOT)]) as i64
    }

    pub fn records_emitted(&self) -> u64 {
        self.sum(|s| &s.records)
    }

    /// The label slot for a backend name (the same name keeps its slot across reloads).
    pub fn slot(&self, name: &str) -> usize {
        let Ok(mut names) = self.slot_names.lock() else {
            return 0;
        };
        if let Some(i) = names.iter().position(|n| n == name) {
            return i;
        }
        if names.len() == OTHER_SLOT {
            return OTHER_SLOT;
        }
        names.push(name.to_string());
        names.len() - 1
    }

    /// The `/metrics` page. `backends`: what the page says of each configured backend
    /// (plain values: metrics knows nothing of the upstream module).
    pub fn render(&self, backends: &[BackendState<'_>], queue_depth: usize) -> String {
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
        for slot in 0..MAX_BACKEND_SLOTS {
            let backend = label_value(names.get(slot).map_or("other", String::as_str));
            for row in 0..rows() {
                let parts: Vec<&[Counter]> = self
                    .shards
                    .iter()
                    .filter_map(|s| s.requests[slot].get()?.get(row)?.get().map(|c| &c[..]))
                    .collect();
                if parts.is_empty() {
                    continue;
                }
                let (path, stream) = (crate::routes::LABELS[row / 2], row % 2 == 1);
                for i in 0..STATUSES {
                    let v: u64 = parts.iter().map(|c| c[i].get()).sum();
                    if v == 0 {
                        continue;
                    }
                    let status = i + 100;
                    let _ = writeln!(
                        o,
                        "llmproxy_requests_total{{path=\"{path}\",stream=\"{stream}\",backend=\"{backend}\",status=\"{status}\"}} {v}"
                    );
                }
            }
        }
        Histogram::render(
            self.shards.iter().map(|s| &s.latency),
            &mut o,
            "llmproxy_latency_ms",
            "Request duration from arrival to the last byte sent, in ms.",
        );
        Histogram::render(
            self.shards.iter().map(|s| &s.ttft),
            &mut o,
            "llmproxy_ttft_ms",
            "Time to first token of streams, from arrival to the first output event forwarded, in ms.",
        );
        Histogram::render(
            self.shards.iter().map(|s| &s.overhead),
            &mut o,
            "llmproxy_proxy_overhead_ms",
            "Time spent in the proxy itself, not waiting for the backend, in ms.",
        );
        let backlog = AtomicU64::new(
            self.spool
                .get()
                .map_or(0, |s| s.backlog_bytes.load(Relaxed)),
        );
        let records = AtomicU64::new(self.records_emitted());
        // The alert an operator sets first: "billing is N seconds behind".
        let oldest_ms = self.spool_oldest_ms.load(Relaxed);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let oldest_age = if oldest_ms == 0 {
            0.0
        } else {
            now_ms.saturating_sub(oldest_ms) as f64 / 1000.0
        };
        let open = AtomicU64::new(self.sum(|s| &s.connections_open));
        let counters: [(&str, &str, &AtomicU64); 14] = [
            (
                "llmproxy_access_log_dropped_total",
                "Access log lines dropped because the log writer fell behind.",
                &self.access_log_dropped,
            ),
            (
                "llmproxy_usage_spooled_total",
                "Usage records taken into the durable spool from the workers' staging rings or queue: written to a segment, or delivered straight from a ring.",
                &self.spooled,
            ),
            (
                "llmproxy_usage_direct_total",
                "Usage records delivered (or dead-lettered) straight from a worker's staging ring, with no segment write: the path while the webhook keeps up.",
                &self.direct,
            ),
            (
                "llmproxy_usage_overflow_total",
                "Usage records a worker spooled itself because the queue to the spool writer was full (usage_hook.queue_size).",
                &self.overflowed,
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
                &records,
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
                &open,
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
            "# HELP llmproxy_rate_limited_total Requests refused by a key's limits (429; 503 for store_down), not forwarded, no usage record.\n# TYPE llmproxy_rate_limited_total counter"
        );
        for (i, reason) in ["rpm", "tpm", "concurrency", "budget", "store_down"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                o,
                "llmproxy_rate_limited_total{{reason=\"{reason}\"}} {}",
                self.rate_limited[i].load(Relaxed)
            );
        }
        let not_after = self.tls_cert_not_after.load(Relaxed);
        if not_after != 0 {
            let _ = writeln!(
                o,
                "# HELP llmproxy_tls_cert_expiry_seconds When the listener's certificate expires (Unix time; alert on it minus time()).\n# TYPE llmproxy_tls_cert_expiry_seconds gauge\nllmproxy_tls_cert_expiry_seconds {not_after}\n# HELP llmproxy_tls_handshake_failures_total TLS handshakes that failed or stalled past header_timeout (the connection was closed).\n# TYPE llmproxy_tls_handshake_failures_total counter\nllmproxy_tls_handshake_failures_total {}",
                self.tls_handshake_failures.load(Relaxed)
            );
        }
        let store = self.limits_store.load(Relaxed);
        if store != 0 {
            let _ = writeln!(
                o,
                "# HELP llmproxy_limits_store_up Whether the last sync with the shared limits store (limits_store) succeeded.\n# TYPE llmproxy_limits_store_up gauge\nllmproxy_limits_store_up {}\n# HELP llmproxy_limits_sync_failures_total Syncs with the limits store that failed (the proxy served on its own counts meanwhile).\n# TYPE llmproxy_limits_sync_failures_total counter\nllmproxy_limits_sync_failures_total {}\n# HELP llmproxy_limits_syncs_total Syncs with the limits store that succeeded.\n# TYPE llmproxy_limits_syncs_total counter\nllmproxy_limits_syncs_total {}",
                u8::from(store == 1),
                self.limits_sync_failures.load(Relaxed),
                self.limits_syncs.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP llmproxy_usage_spool_oldest_age_seconds Age of the oldest usage record not yet delivered (0 when none waits).\n# TYPE llmproxy_usage_spool_oldest_age_seconds gauge\nllmproxy_usage_spool_oldest_age_seconds {oldest_age:.3}"
        );
        let _ = writeln!(
            o,
            "# HELP llmproxy_usage_tokens_total Tokens billed, from usage records.\n# TYPE llmproxy_usage_tokens_total counter"
        );
        let _ = writeln!(
            o,
            "llmproxy_usage_tokens_total{{type=\"prompt\"}} {}",
            self.sum(|s| &s.tokens_prompt)
        );
        let _ = writeln!(
            o,
            "llmproxy_usage_tokens_total{{type=\"completion\"}} {}",
            self.sum(|s| &s.tokens_completion)
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
                label_value(b.name),
                b.healthy as u8
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
                label_value(b.name),
                self.in_flight(b.slot)
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_past_the_slots_count_as_other_not_as_another_backend() {
        let m = Arc::new(Metrics::new(1));
        let w = m.claim(0).expect("shard 0");
        let slots: Vec<usize> = (0..300).map(|i| m.slot(&format!("b{i}"))).collect();
        // Slot 0 is `none`: names take slots 1..=254, and every later one `other`.
        assert_eq!(slots[253], OTHER_SLOT - 1);
        assert!(slots[254..].iter().all(|&s| s == OTHER_SLOT));
        assert_eq!(m.slot("b299"), OTHER_SLOT);
        assert_eq!(m.slot("b7"), slots[7], "a known name keeps its slot");
        w.count_request(0, false, Some(slots[253]), 200);
        w.count_request(0, false, Some(slots[254]), 200);
        w.count_request(0, false, Some(slots[299]), 200);
        let text = m.render(&[], 0);
        let row = |b: &str| {
            format!(
                "path=\"/v1/chat/completions\",stream=\"false\",backend=\"{b}\",status=\"200\"}} "
            )
        };
        assert!(text.contains(&format!("{}1\n", row("b253"))), "{text}");
        assert!(text.contains(&format!("{}2\n", row("other"))), "{text}");
        assert!(!text.contains("b254") && !text.contains("b299"), "{text}");
    }

    #[test]
    fn request_counter_labels_round_trip() {
        let m = Arc::new(Metrics::new(1));
        let w = m.claim(0).expect("shard 0");
        let (_a, b) = (m.slot("a"), m.slot("b"));
        assert_eq!(m.slot("b"), b);
        w.count_request(0, true, Some(b), 200);
        let other = crate::routes::other_label();
        w.count_request(other, false, None, 401);
        w.count_request(other, false, None, 401);
        let text = m.render(&[], 0);
        assert!(text.contains("llmproxy_requests_total{path=\"/v1/chat/completions\",stream=\"true\",backend=\"b\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("llmproxy_requests_total{path=\"other\",stream=\"false\",backend=\"none\",status=\"401\"} 2"));
        assert!(text.contains("llmproxy_webhook_success_total 0"));
    }

    #[test]
    fn backend_names_are_escaped_in_label_values() {
        let m = Arc::new(Metrics::new(1));
        let w = m.claim(0).expect("shard 0");
        let slot = m.slot("gpu \"a\"\\1\nx");
        w.count_request(0, false, Some(slot), 200);
        let text = m.render(&[], 0);
        assert!(
            text.contains("backend=\"gpu \\\"a\\\"\\\\1\\nx\",status=\"200\"} 1\n"),
            "{text}"
        );
        // Every sample is one line of `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("llmproxy_"), "{line:?}");
        }
        assert_eq!(label_value("plain"), "plain");
    }

    #[test]
    fn the_oldest_spooled_record_has_an_age() {
        let m = Arc::new(Metrics::new(1));
        let gauge = |m: &Metrics| -> f64 {
            m.render(&[], 0)
                .lines()
                .find_map(|l| l.strip_prefix("llmproxy_usage_spool_oldest_age_seconds "))
                .and_then(|v| v.parse().ok())
                .expect("gauge present")
        };
        assert_eq!(gauge(&m), 0.0);
        let ten_s_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            - 10_000;
        m.spool_oldest_ms.store(ten_s_ago, Relaxed);
        let age = gauge(&m);
        assert!((10.0..11.0).contains(&age), "{age}");
    }

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(MS_BUCKETS);
        h.observe_us(500);
        h.observe_us(7_000);
        h.observe_us(999_000_000);
        let mut o = String::new();
        Histogram::render([&h].into_iter(), &mut o, "x", "x");
        assert!(o.contains("x_bucket{le=\"1\"} 1\n"));
        assert!(o.contains("x_bucket{le=\"10\"} 2\n"));
        assert!(o.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(o.contains("x_count 3\n"));
    }

    #[test]
    fn a_scrape_sums_the_workers_shards() {
        let m = Arc::new(Metrics::new(2));
        let slot = m.slot("b");
        // Two workers count on threads of their own, each claiming its shard, the way
        // the server runs them.
        std::thread::scope(|s| {
            for i in 0..2 {
                let m = m.clone();
                s.spawn(move || {
                    let Some(w) = m.claim(i) else {
                        panic!("shard {i} taken");
                    };
                    for _ in 0..1000 {
                        w.count_request(0, false, Some(slot), 200);
                        w.latency_us(2_000);
                        w.record(3, 4);
                        w.request_started();
                        w.backend_started(slot);
                        w.connection_opened();
                    }
                    w.request_done();
                    w.backend_done(slot);
                    w.connection_closed();
                });
            }
        });
        assert!(m.claim(0).is_none(), "a shard has one writer");
        assert!(m.claim(2).is_none());
        let text = m.render(&[], 0);
        assert!(
            text.contains("backend=\"b\",status=\"200\"} 2000\n"),
            "{text}"
        );
        assert!(text.contains("llmproxy_latency_ms_bucket{le=\"5\"} 2000\n"));
        assert!(text.contains("llmproxy_latency_ms_sum 4000\n"));
        assert!(text.contains("llmproxy_usage_records_total 2000\n"));
        assert!(text.contains("llmproxy_usage_tokens_total{type=\"prompt\"} 6000\n"));
        assert!(text.contains("llmproxy_usage_tokens_total{type=\"completion\"} 8000\n"));
        assert!(text.contains("llmproxy_connections_open 1998\n"));
        assert_eq!(m.busy(), 1998);
        assert_eq!(m.in_flight(slot), 1998);
    }
}
