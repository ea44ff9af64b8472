//! Delivery of usage records to billing. Workers hand records to a bounded channel with
//! `try_send` (a worker never waits). With a spool (the default), a writer thread
//! appends every record to disk in batches before anything tries to deliver it
//! (fdatasync at most every `SYNC_INTERVAL`), and a sender thread POSTs spooled records
//! oldest first, advancing the spool cursor only once the webhook took a record (2xx)
//! or refused it for good (4xx other than 408/429: dead letter). While the webhook is
//! down, records wait on disk, also across restarts and crashes. POSTs are pipelined
//! on one connection, at most `usage_hook.pipeline` in flight: a recovering receiver
//! gets a bounded load from each proxy.
//!
//! Without a spool (`spool_dir: ""`) the sender reads the channel directly and a
//! record that exhausts its retries is logged in full and counted, nothing more.

pub mod spool;
pub mod webhook;

use crate::config::UsageHookConfig;
use crate::metrics::Metrics;
use crate::usage::UsageRecord;
use crate::{error, info, warn};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use spool::{Next, Spool, SpoolReader, SpoolWriter};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Most bytes the writer buffers before a commit (one fsync covers them all).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long the writer gathers records after the first before writing them to the
/// spool (then they survive a proxy crash): one write per window, whatever the request
/// rate. Part of the durability window.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(5);
/// Longest a written record waits for fdatasync (then it survives power loss). An
/// fdatasync costs ~100 us of CPU here; one per 5 ms window was half the billing cost
/// at moderate rates.
const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// A sender batch smaller than `pipeline` waits this long for more records first: at
/// low rates, one webhook round trip per 15 ms rather than per commit window.
const SEND_GATHER: Duration = Duration::from_millis(10);
/// After the webhook failed a record, wait this long (doubling) before trying again.
const STALL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_STALL_BACKOFF: Duration = Duration::from_secs(5);
/// At shutdown, spooled records are delivered for at most this long; the rest waits
/// in the spool for the next start.
const SHUTDOWN_DELIVERY: Duration = Duration::from_secs(10);

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

    pub fn queue_depth(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.len())
    }

    /// Tells the delivery threads to spool or deliver what is queued and stop. Call
    /// once the workers are done.
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
    }

    pub fn emit(&self, record: UsageRecord) {
        let m = &self.metrics;
        m.records_emitted.fetch_add(1, Relaxed);
        m.tokens_prompt
            .fetch_add(record.usage.prompt_tokens, Relaxed);
        m.tokens_completion
            .fetch_add(record.usage.completion_tokens, Relaxed);
        let Some(tx) = &self.tx else { return };
        if let Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) = tx.try_send(record) {
            m.records_dropped.fetch_add(1, Relaxed);
            error!(
                "usage queue full: record not queued; UNDELIVERED RECORD: {}",
                String::from_utf8_lossy(&r.to_json())
            );
        }
    }
}

/// Puts the calling thread in `SCHED_BATCH`: it gets its fair share of the CPU as
/// before, but waking up (every group-commit window, every batch) no longer preempts
/// a worker in the middle of its requests; it runs when the worker's slice ends or
/// the worker waits. Unlike `SCHED_IDLE` it cannot be starved, so records still flow
/// under full load. Best effort: on failure the thread keeps the normal policy.
fn no_wakeup_preemption() {
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid param
    // struct; SCHED_BATCH requires priority 0.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
}

/// Starts the delivery threads. Join the handles after `RecordSink::close`.
pub fn start(
    cfg: &UsageHookConfig,
    metrics: Arc<Metrics>,
) -> Result<(RecordSink, Vec<JoinHandle<()>>), String> {
    let (tx, rx) = crossbeam_channel::bounded(cfg.queue_size);
    let closing = Arc::new(AtomicBool::new(false));
    let outbox = Outbox::new(cfg, metrics.clone());
    let mut handles = Vec::new();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                no_wakeup_preemption();
                f()
            })
            .map_err(|e| format!("cannot start the {name} thread: {e}"))
    };
    if cfg.spool_dir.is_empty() {
        warn!(
            "usage_hook.spool_dir is empty: THE USAGE SPOOL IS DISABLED. Records the webhook cannot take are lost on restart (they are logged in full and counted)"
        );
        let stop = closing.clone();
        handles.push(spawn(
            "usage-sender",
            Box::new(move || outbox.run_memory(rx, &stop)),
        )?);
    } else {
        let spool = Spool::open(Path::new(&cfg.spool_dir))?;
        let backlog = spool.shared.backlog_bytes.load(Relaxed);
        if backlog > 0 {
            info!(
                "usage spool {}: {backlog} bytes of records from before this start will be delivered first",
                cfg.spool_dir
            );
        }
        let _ = metrics.spool.set(spool.shared.clone());
        let writer = spool.writer().map_err(|e| {
            format!(
                "usage_hook.spool_dir: cannot create a segment in {}: {e}",
                cfg.spool_dir
            )
        })?;
        let reader = spool.reader();
        let (stop_w, stop_s) = (closing.clone(), closing.clone());
        let m = metrics.clone();
        handles.push(spawn(
            "usage-spool",
            Box::new(move || write_spool(rx, writer, &m, &stop_w)),
        )?);
        let dir = spool.dir.clone();
        let keep = Arc::new(spool); // holds the directory lock while the threads run
        handles.push(spawn(
            "usage-sender",
            Box::new(move || {
                outbox.run_spool(reader, &dir, &stop_s);
                drop(keep);
            }),
        )?);
    }
    Ok((
        RecordSink {
            tx: Some(tx),
            metrics,
            closing,
        },
        handles,
    ))
}

/// The spool writer thread: channel → disk, one write per batch, one fdatasync per
/// `SYNC_INTERVAL` (and whenever the channel goes quiet).
fn write_spool(
    rx: Receiver<UsageRecord>,
    mut writer: SpoolWriter,
    metrics: &Metrics,
    closing: &AtomicBool,
) {
    let mut batch = 0u64;
    let mut last_sync = Instant::now();
    // The last window took records: traffic is steady, so the next window is slept out
    // and then drained without blocking on the channel. A worker's send then never
    // has a sleeping receiver to wake (a futex wake in the worker, two context switches
    // and crossbeam's spin-and-yield before blocking, every window).
    let mut steady = false;
    loop {
        let mut quiet = false;
        let first = if steady {
            std::thread::sleep(GROUP_COMMIT_WINDOW);
            None
        } else {
            match rx.recv_timeout(Duration::from_millis(50)) {
                // Group commit: let records gather for the window while this thread
                // sleeps (so a worker's send never has a sleeper to wake), then take
                // them all; one write covers the lot.
                Ok(r) => {
                    std::thread::sleep(GROUP_COMMIT_WINDOW);
                    Some(r)
                }
                Err(RecvTimeoutError::Timeout) if closing.load(Relaxed) && rx.is_empty() => break,
                Err(RecvTimeoutError::Timeout) => {
                    quiet = true;
                    None
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        let taken = batch;
        for r in first.into_iter().chain(rx.try_iter()) {
            writer.append_with(|buf| r.write_json(buf));
            batch += 1;
            if writer.pending() >= MAX_BATCH_BYTES {
                break;
            }
        }
        steady = batch > taken;
        let sync = quiet || last_sync.elapsed() >= SYNC_INTERVAL;
        match writer.write_out(sync) {
            Ok(()) => {
                if sync {
                    last_sync = Instant::now();
                }
                metrics
                    .spooled
                    .fetch_add(std::mem::take(&mut batch), Relaxed)
            }
            Err(e) => {
                // Kept in memory and retried: the queue fills, then workers log and count.
                error!("usage spool: write failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(200));
                0
            }
        };
    }
    writer.close();
}

enum Delivery {
    Delivered,
    Refused(u16, String),
    Failed(String),
}

enum Attempt {
    Delivered,
    Retryable(String),
    Permanent(u16, String),
}

struct Outbox {
    /// Plain http:// webhooks: the lean pipelining client; https:// goes through ureq.
    plain: Option<webhook::PlainHttp>,
    /// Most records POSTed back to back before reading the answers.
    pipeline: usize,
    agent: ureq::Agent,
    url: String,
    headers: Vec<(String, String)>,
    retries: u32,
    metrics: Arc<Metrics>,
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
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        let headers: Vec<(String, String)> = cfg
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Outbox {
            plain: webhook::PlainHttp::new(&cfg.url, &headers, cfg.timeout.0),
            pipeline: cfg.pipeline.max(1),
            agent,
            url: cfg.url.clone(),
            headers,
            retries: cfg.retry,
            metrics,
            rng: seed | 1,
        }
    }

    fn run_memory(mut self, rx: Receiver<UsageRecord>, closing: &AtomicBool) {
        let mut body = Vec::with_capacity(1024);
        loop {
            let r = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) if closing.load(Relaxed) => break,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            body.clear();
            r.write_json(&mut body);
            match self.deliver(&body, &r.request_id) {
                Delivery::Delivered => {}
                Delivery::Refused(status, excerpt) => {
                    self.metrics.dead_letter.fetch_add(1, Relaxed);
                    error!(
                        "usage webhook refused {} with {status} ({excerpt}); no spool; UNDELIVERED RECORD: {}",
                        r.request_id,
                        String::from_utf8_lossy(&body)
                    );
                }
                Delivery::Failed(why) => {
                    self.metrics.records_dropped.fetch_add(1, Relaxed);
                    error!(
                        "usage webhook: giving up on {} ({why}); no spool; UNDELIVERED RECORD: {}",
                        r.request_id,
                        String::from_utf8_lossy(&body)
                    );
                }
            }
        }
    }

    fn run_spool(mut self, mut reader: SpoolReader, dir: &Path, closing: &AtomicBool) {
        let mut stall = Duration::ZERO;
        let mut closed_at: Option<Instant> = None;
        let shared = reader.shared();
        // Records delivered while catching up (after an outage, or left from before
        // this start) count as re-delivered from the spool.
        let mut catching_up = shared.backlog_bytes.load(Relaxed) > 0;
        let mut lines: Vec<Vec<u8>> = Vec::with_capacity(self.pipeline);
        loop {
            if closing.load(Relaxed) {
                let at = *closed_at.get_or_insert_with(Instant::now);
                if at.elapsed() > SHUTDOWN_DELIVERY || !stall.is_zero() {
                    break;
                }
            }
            // A batch: the oldest record (waiting for one), then whatever else is
            // already spooled, up to `pipeline`. Line buffers go back to the reader.
            reader.recycle(&mut lines);
            match reader.next(Duration::from_millis(100)) {
                Next::Record(line) => lines.push(line),
                Next::Empty => {
                    self.metrics.spool_oldest_ms.store(0, Relaxed);
                    catching_up = false;
                    continue;
                }
                Next::Closed => break,
            }
            for gather in [Duration::ZERO, SEND_GATHER] {
                if lines.len() == self.pipeline || !stall.is_zero() || closing.load(Relaxed) {
                    break;
                }
                std::thread::sleep(gather);
                while lines.len() < self.pipeline {
                    match reader.next(Duration::ZERO) {
                        Next::Record(line) => lines.push(line),
                        _ => break,
                    }
                }
            }
            self.metrics
                .spool_oldest_ms
                .store(record_time_ms(&lines[0]), Relaxed);
            let ids: Vec<Cow<str>> = lines.iter().map(|l| record_id(l)).collect();
            let results = self.deliver_batch(&lines, &ids);
            for ((line, id), result) in lines.iter().zip(&ids).zip(results) {
                match result {
                    Delivery::Delivered => {
                        reader.ack();
                        if !stall.is_zero() {
                            info!(
                                "usage webhook is taking records again; delivering the spool oldest first"
                            );
                            stall = Duration::ZERO;
                        }
                        if catching_up {
                            self.metrics.redelivered.fetch_add(1, Relaxed);
                        }
                    }
                    Delivery::Refused(status, excerpt) => match spool::dead_letter(dir, line) {
                        Ok(()) => {
                            self.metrics.dead_letter.fetch_add(1, Relaxed);
                            error!(
                                "usage webhook refused {id} with {status} ({excerpt}); moved to {}",
                                dir.join("dead-letter.jsonl").display()
                            );
                            reader.ack();
                        }
                        Err(e) => {
                            error!(
                                "usage spool: cannot write dead letter for {id}: {e}; it stays spooled"
                            );
                            std::thread::sleep(STALL_BACKOFF);
                            break;
                        }
                    },
                    Delivery::Failed(why) => {
                        catching_up = true;
                        stall = if stall.is_zero() {
                            STALL_BACKOFF
                        } else {
                            (stall * 2).min(MAX_STALL_BACKOFF)
                        };
                        warn!(
                            "usage webhook unavailable ({why}); {id} and later records wait in the spool, next try in {stall:?}"
                        );
                        sleep_unless(stall, closing);
                        break;
                    }
                }
            }
            reader.save();
            // Whatever was handed out and not acknowledged comes again, oldest first.
            reader.rewind();
        }
        let left = shared.backlog_bytes.load(Relaxed);
        if left > 0 {
            warn!(
                "usage delivery stopping with {left} bytes of records in the spool; they are delivered at the next start"
            );
        }
        info!("usage delivery stopped");
    }

    /// One record, with `retry` further attempts on retryable failures.
    fn deliver(&mut self, body: &[u8], request_id: &str) -> Delivery {
        let mut attempt = 0;
        loop {
            match self.post(body, request_id) {
                Attempt::Delivered => {
                    self.metrics.webhook_success.fetch_add(1, Relaxed);
                    return Delivery::Delivered;
                }
                Attempt::Permanent(status, excerpt) => {
                    self.metrics.webhook_failure.fetch_add(1, Relaxed);
                    return Delivery::Refused(status, excerpt);
                }
                Attempt::Retryable(why) if attempt < self.retries => {
                    attempt += 1;
                    self.metrics.webhook_retries.fetch_add(1, Relaxed);
                    std::thread::sleep(self.backoff(attempt));
                    let _ = why;
                }
                Attempt::Retryable(why) => {
                    self.metrics.webhook_failure.fetch_add(1, Relaxed);
                    return Delivery::Failed(why);
                }
            }
        }
    }

    fn post(&mut self, body: &[u8], request_id: &str) -> Attempt {
        if let Some(plain) = self.plain.as_mut() {
            return match plain.post_many(&[(body, request_id)]).pop() {
                Some(answer) => classify(answer),
                None => Attempt::Retryable("no answer".into()),
            };
        }
        let mut req = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .header("idempotency-key", request_id);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send(body) {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .with_config()
                    .limit(4096)
                    .read_to_vec()
                    .unwrap_or_default();
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                classify(Ok((status, excerpt)))
            }
            Err(e) => Attempt::Retryable(e.to_string()),
        }
    }

    /// Several spooled records at once: pipelined on the plain client, then any that
    /// failed retryably go through `deliver` (with its retries) one by one. Answers
    /// cover a prefix of `lines`: delivery stops at the first record that fails.
    fn deliver_batch(&mut self, lines: &[Vec<u8>], ids: &[Cow<str>]) -> Vec<Delivery> {
        let first: Vec<Attempt> = match self.plain.as_mut() {
            Some(plain) if lines.len() > 1 => {
                let items: Vec<(&[u8], &str)> = lines
                    .iter()
                    .zip(ids)
                    .map(|(l, id)| (&l[..], id.as_ref()))
                    .collect();
                plain.post_many(&items).into_iter().map(classify).collect()
            }
            _ => Vec::new(),
        };
        let mut out = Vec::with_capacity(lines.len());
        for (i, (line, id)) in lines.iter().zip(ids).enumerate() {
            let d = match first.get(i) {
                Some(Attempt::Delivered) => {
                    self.metrics.webhook_success.fetch_add(1, Relaxed);
                    Delivery::Delivered
                }
                Some(Attempt::Permanent(status, excerpt)) => {
                    self.metrics.webhook_failure.fetch_add(1, Relaxed);
                    Delivery::Refused(*status, excerpt.clone())
                }
                Some(Attempt::Retryable(_)) => {
                    // The pipelined attempt failed: what follows is a retry.
                    self.metrics.webhook_retries.fetch_add(1, Relaxed);
                    self.deliver(line, id)
                }
                None => self.deliver(line, id),
            };
            let failed = matches!(d, Delivery::Failed(_));
            out.push(d);
            if failed {
                break;
            }
        }
        out
    }

    /// Exponential backoff from 100 ms, capped at 10 s, with ±50 % jitter so a fleet of
    /// proxies does not retry in lockstep.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let base = 100u64.saturating_mul(1 << attempt.min(10)).min(10_000);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        Duration::from_millis(base / 2 + self.rng % base.max(1))
    }
}

fn classify(answer: webhook::Answer) -> Attempt {
    match answer {
        Ok((200..=299, _)) => Attempt::Delivered,
        Ok((status @ (408 | 429 | 500..=599), _)) => Attempt::Retryable(format!("status {status}")),
        Ok((status, excerpt)) => Attempt::Permanent(status, excerpt),
        Err(e) => Attempt::Retryable(e),
    }
}

fn sleep_unless(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The request id of a spooled record. Records this proxy wrote start with
/// `{"request_id":"...",` (ids have nothing to escape), read without parsing the line;
/// anything else is parsed.
fn record_id(line: &[u8]) -> Cow<'_, str> {
    const KEY: &[u8] = b"{\"request_id\":\"";
    if let Some(rest) = line.strip_prefix(KEY)
        && let Some(end) = memchr::memchr2(b'"', b'\\', rest)
        && rest[end] == b'"'
        && let Ok(id) = std::str::from_utf8(&rest[..end])
    {
        return Cow::Borrowed(id);
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(default)]
        request_id: String,
    }
    Cow::Owned(
        serde_json::from_slice::<Meta>(line).map_or_else(|_| String::new(), |m| m.request_id),
    )
}

/// The arrival time (unix ms) of a spooled record; 0 when it has none.
fn record_time_ms(line: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(default)]
        timestamp: String,
    }
    serde_json::from_slice::<Meta>(line)
        .ok()
        .and_then(|m| humantime::parse_rfc3339(&m.timestamp).ok())
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// `llmproxy spool replay-dead`: POSTs every dead-lettered record again; those the
/// webhook now takes are removed, the rest stay. Returns (delivered, kept).
pub fn replay_dead(cfg: &UsageHookConfig) -> Result<(usize, usize), String> {
    if cfg.spool_dir.is_empty() {
        return Err("usage_hook.spool_dir is empty: there is no dead-letter file".into());
    }
    let path = PathBuf::from(&cfg.spool_dir).join("dead-letter.jsonl");
    let (lines, file) =
        spool::take_dead_letters(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let metrics = Arc::new(Metrics::new());
    let mut outbox = Outbox::new(cfg, metrics);
    let mut kept = Vec::new();
    let mut delivered = 0;
    for line in lines {
        let id = record_id(&line);
        match outbox.deliver(&line, &id) {
            Delivery::Delivered => delivered += 1,
            Delivery::Refused(status, excerpt) => {
                eprintln!("{id}: refused again with {status} ({excerpt})");
                kept.push(line);
            }
            Delivery::Failed(why) => {
                eprintln!("{id}: not delivered ({why})");
                kept.push(line);
            }
        }
    }
    let n = kept.len();
    spool::put_back_dead_letters(file, &kept).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((delivered, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_id_reads_our_lines_without_parsing_and_anything_else_by_parsing() {
        assert_eq!(record_id(br#"{"request_id":"abc-1","model":"m"}"#), "abc-1");
        // Another key first, an escape in the id, extra spaces: parsed.
        assert_eq!(record_id(br#"{"model":"m","request_id":"x"}"#), "x");
        assert_eq!(record_id(br#"{"request_id":"a\"b"}"#), "a\"b");
        assert_eq!(record_id(br#"{ "request_id" : "s" }"#), "s");
        // A key that only looks like it, inside another string.
        assert_eq!(
            record_id(br#"{"k":"{\"request_id\":\"no\"}","request_id":"yes"}"#),
            "yes"
        );
        assert_eq!(record_id(b"not json"), "");
        assert_eq!(record_id(br#"{"request_id":"#), "");
    }

    #[test]
    fn record_time_reads_the_timestamp() {
        assert_eq!(
            record_time_ms(br#"{"request_id":"a","timestamp":"1970-01-01T00:00:01.500Z"}"#),
            1500
        );
        assert_eq!(record_time_ms(br#"{"timestamp":"soon"}"#), 0);
    }
}
