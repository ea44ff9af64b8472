//! Delivery of usage records to billing: workers hand records to a bounded channel
//! with `try_send` (a worker never waits), and one dedicated thread POSTs each record
//! to `usage_hook.url` with retries, exponential backoff and jitter.
//!
//! What cannot be delivered is counted and logged with the full record, so nothing is
//! lost silently; the durable spool plugs in at `Outbox::undeliverable`.

use crate::config::UsageHookConfig;
use crate::metrics::Metrics;
use crate::usage::UsageRecord;
use crate::{error, info, warn};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

/// The workers' side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct RecordSink {
    tx: Option<Sender<UsageRecord>>,
    metrics: Arc<Metrics>,
    closing: Arc<AtomicBool>,
}

impl RecordSink {
    /// A sink that only counts (usage_hook disabled).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        RecordSink {
            tx: None,
            metrics,
            closing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Tells the delivery thread to deliver what is queued and stop. Records emitted
    /// afterwards still count but may not be delivered: call once workers are done.
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
    }

    pub fn queue_depth(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.len())
    }

    pub fn emit(&self, record: UsageRecord) {
        let m = &self.metrics;
        m.records_emitted.fetch_add(1, Relaxed);
        m.tokens_prompt
            .fetch_add(record.usage.prompt_tokens, Relaxed);
        m.tokens_completion
            .fetch_add(record.usage.completion_tokens, Relaxed);
        let Some(tx) = &self.tx else { return };
        match tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(r)) | Err(TrySendError::Disconnected(r)) => {
                m.records_dropped.fetch_add(1, Relaxed);
                error!(
                    "usage queue full: record not queued: {}",
                    String::from_utf8_lossy(&r.to_json())
                );
            }
        }
    }
}

/// Starts the delivery thread. The thread ends once every `RecordSink` clone is
/// dropped and the queue is drained.
pub fn start(
    cfg: &UsageHookConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<(RecordSink, std::thread::JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded(cfg.queue_size);
    let outbox = Outbox::new(cfg, metrics.clone());
    let closing = Arc::new(AtomicBool::new(false));
    let stop = closing.clone();
    let handle = std::thread::Builder::new()
        .name("usage-delivery".into())
        .spawn(move || outbox.run(rx, &stop))?;
    Ok((
        RecordSink {
            tx: Some(tx),
            metrics,
            closing,
        },
        handle,
    ))
}

enum Attempt {
    Delivered,
    Retryable(String),
    Permanent(u16, String),
}

struct Outbox {
    agent: ureq::Agent,
    url: String,
    headers: Vec<(String, String)>,
    retries: u32,
    metrics: Arc<Metrics>,
    body: Vec<u8>,
    rng: u64,
}

impl Outbox {
    fn new(cfg: &UsageHookConfig, metrics: Arc<Metrics>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout.0))
            .http_status_as_error(false)
            .user_agent("llmproxy")
            .build()
            .into();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        Outbox {
            agent,
            url: cfg.url.clone(),
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            retries: cfg.retry,
            metrics,
            body: Vec::with_capacity(1024),
            rng: seed | 1,
        }
    }

    fn run(mut self, rx: Receiver<UsageRecord>, closing: &AtomicBool) {
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(record) => self.deliver(&record),
                Err(RecvTimeoutError::Timeout) if closing.load(Relaxed) => break,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(record) = rx.try_recv() {
            self.deliver(&record);
        }
        info!("usage delivery: queue drained, delivery thread stopping");
    }

    fn deliver(&mut self, record: &UsageRecord) {
        self.body.clear();
        record.write_json(&mut self.body);
        let mut attempt = 0;
        loop {
            match self.post(&record.request_id) {
                Attempt::Delivered => {
                    self.metrics.webhook_success.fetch_add(1, Relaxed);
                    return;
                }
                Attempt::Permanent(status, body) => {
                    self.metrics.webhook_failure.fetch_add(1, Relaxed);
                    self.metrics.dead_letter.fetch_add(1, Relaxed);
                    error!(
                        "usage webhook refused record {} with {status} ({body}); record: {}",
                        record.request_id,
                        String::from_utf8_lossy(&self.body)
                    );
                    return;
                }
                Attempt::Retryable(why) if attempt < self.retries => {
                    attempt += 1;
                    self.metrics.webhook_retries.fetch_add(1, Relaxed);
                    let wait = self.backoff(attempt);
                    warn!(
                        "usage webhook: {why}; retry {attempt}/{} for {} in {wait:?}",
                        self.retries, record.request_id
                    );
                    std::thread::sleep(wait);
                }
                Attempt::Retryable(why) => {
                    self.undeliverable(record, &why);
                    return;
                }
            }
        }
    }

    fn post(&mut self, request_id: &str) -> Attempt {
        let mut req = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .header("idempotency-key", request_id);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send(&self.body[..]) {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .with_config()
                    .limit(4096)
                    .read_to_vec()
                    .unwrap_or_default();
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                match status {
                    200..=299 => Attempt::Delivered,
                    408 | 429 | 500..=599 => Attempt::Retryable(format!("status {status}")),
                    _ => Attempt::Permanent(status, excerpt),
                }
            }
            Err(e) => Attempt::Retryable(e.to_string()),
        }
    }

    /// Exponential backoff from 100 ms, capped at 10 s, with ±50 % jitter so a fleet of
    /// proxies does not retry in lockstep.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let base = 100u64.saturating_mul(1 << attempt.min(10)).min(10_000);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = self.rng % base.max(1);
        Duration::from_millis(base / 2 + jitter)
    }

    /// The seam for the durable spool: until it lands, the record is logged in full
    /// (jq-readable after the marker) and counted.
    fn undeliverable(&mut self, record: &UsageRecord, why: &str) {
        self.metrics.webhook_failure.fetch_add(1, Relaxed);
        error!(
            "usage webhook: giving up on {} after {} attempts ({why}); UNDELIVERED RECORD: {}",
            record.request_id,
            self.retries + 1,
            String::from_utf8_lossy(&self.body)
        );
    }
}
