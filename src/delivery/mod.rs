//! Delivery of usage records to billing. Each worker serializes its records into a
//! batch and hands it to a bounded channel with `try_send` every `HANDOVER` (a worker
//! never waits). With a spool (the default), a writer thread appends every batch to
//! disk as it comes, before anything tries to deliver its records
//! (fdatasync at most every `SYNC_INTERVAL`), and a sender thread POSTs spooled records
//! oldest first, advancing the spool cursor only once the webhook took a record (2xx)
//! or refused it for good (4xx other than 408/429: dead letter). While the webhook is
//! down, records wait on disk, also across restarts and crashes. POSTs are pipelined
//! on one connection, at most `usage_hook.pipeline` in flight: a recovering receiver
//! gets a bounded load from each proxy.
//!
//! Without a spool (`spool_dir: ""`) the sender reads the channel directly and a
//! record that exhausts its retries is logged in full and counted, nothing more.

pub mod signing;
pub mod spool;
pub mod webhook;

use crate::config::UsageHookConfig;
use crate::metrics::{Metrics, WorkerMetrics};
use crate::usage::UsageRecord;
use crate::{error, info, warn};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use spool::{Next, Overflow, Spool, SpoolReader, SpoolWriter};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Most bytes the writer buffers before a commit (one fsync covers them all).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long a worker gathers records after the first before handing them over; the
/// spool writer writes them at once (then they survive a proxy crash). Part of the
/// durability window.
const HANDOVER: Duration = Duration::from_millis(5);
/// A worker hands its batch over early once it holds this many bytes.
const BATCH_BYTES: usize = 256 * 1024;
/// Most bytes a worker holds while neither the queue nor the spool takes its batch (a
/// disk that refuses writes); beyond it records are logged in full and counted.
const MAX_HELD_BYTES: usize = 4 * BATCH_BYTES;
/// Most batches in the channel; records are bounded by `queue_size` separately.
const MAX_BATCHES: usize = 4096;
/// At a worker's end, how long its last batch may wait for room in the queue.
const FINAL_HANDOVER: Duration = Duration::from_secs(5);
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

/// The shared side, held by the server: makes each worker's `WorkerSink`, reports the
/// queue depth, and tells the delivery threads to finish.
#[derive(Clone)]
pub struct RecordSink {
    tx: Option<Sender<Batch>>,
    /// Records in batches handed over and not yet taken by a delivery thread.
    queued: Arc<AtomicUsize>,
    /// `usage_hook.queue_size`.
    limit: usize,
    /// With a spool: where a worker writes a batch the queue has no room for.
    overflow: Option<Arc<Overflow>>,
    metrics: Arc<Metrics>,
    closing: Arc<AtomicBool>,
}

/// Records a worker serialized, handed to the delivery threads together.
pub struct Batch {
    /// Spool lines: each record's JSON and a newline.
    lines: Vec<u8>,
    records: usize,
}

impl Batch {
    fn with_capacity(bytes: usize) -> Self {
        Batch {
            lines: Vec::with_capacity(bytes),
            records: 0,
        }
    }
}

impl RecordSink {
    /// A sink that only counts (usage_hook disabled).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        RecordSink {
            tx: None,
            queued: Arc::new(AtomicUsize::new(0)),
            limit: 0,
            overflow: None,
            metrics,
            closing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Records handed over and not yet taken by the delivery threads.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Relaxed)
    }

    /// Tells the delivery threads to spool or deliver what is queued and stop. Call
    /// once the workers are done.
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
    }

    /// One worker's sink; run its `hand_over_loop` as a task on that worker.
    pub fn worker(&self, stats: WorkerMetrics) -> WorkerSink {
        WorkerSink {
            sink: self.clone(),
            stats,
            batch: RefCell::new(Batch::with_capacity(0)),
            waiting: Cell::new(None),
            overflow_failing: Cell::new(false),
        }
    }
}

/// A worker's side of the sink. Records are serialized here, on the worker, while
/// their fields are still in this core's cache, into a batch of spool lines that is
/// handed to the delivery threads `HANDOVER` after its first record (or at
/// `BATCH_BYTES`): one channel send per batch, not a struct with five heap strings per
/// record for another core to read and free. The serialization costs the worker about
/// what it cost the spool writer (~0.35 us per record); the writer is left with the
/// page-cache write, and the channel with a batch per `HANDOVER`.
///
/// Never blocks, and with a spool never drops a record: when the queue holds
/// `queue_size` records, the worker writes its batch to an overflow file in the spool
/// itself (`spool::Overflow`). Only if the disk refuses that too does it hold the batch
/// (up to `MAX_HELD_BYTES`, then records are logged in full and counted). Without a
/// spool, a batch that finds the queue full stays with the worker and is offered
/// again each `HANDOVER`; a record that finds `queue_size` records held by its worker
/// too is logged in full and counted as dropped.
pub struct WorkerSink {
    sink: RecordSink,
    /// The worker's metrics shard (records and tokens are counted there).
    stats: WorkerMetrics,
    batch: RefCell<Batch>,
    /// The hand-over task, parked while the batch is empty.
    waiting: Cell<Option<Waker>>,
    /// The last overflow write failed (logged once until one succeeds).
    overflow_failing: Cell<bool>,
}

impl WorkerSink {
    pub fn emit(&self, record: &UsageRecord) {
        let m = &self.sink.metrics;
        self.stats
            .record(record.usage.prompt_tokens, record.usage.completion_tokens);
        if self.sink.tx.is_none() {
            return;
        }
        let mut b = self.batch.borrow_mut();
        if self.holds_all_it_may(&b) {
            m.records_dropped.fetch_add(1, Relaxed);
            error!(
                "usage queue full: record not queued; UNDELIVERED RECORD: {}",
                String::from_utf8_lossy(&record.to_json())
            );
            return;
        }
        record.write_json(&mut b.lines);
        b.lines.push(b'\n');
        b.records += 1;
        if b.records == 1
            && let Some(w) = self.waiting.take()
        {
            w.wake();
        }
        if b.lines.len() >= BATCH_BYTES {
            self.flush(&mut b);
        }
    }

    /// Whether the batch may take no further record: without a spool, memory is all
    /// there is and `queue_size` bounds it; with one, only a disk that refuses the
    /// overflow too makes a worker hold records, up to `MAX_HELD_BYTES`.
    fn holds_all_it_may(&self, b: &Batch) -> bool {
        match self.sink.overflow {
            Some(_) => b.lines.len() >= MAX_HELD_BYTES,
            None => b.records >= self.sink.limit,
        }
    }

    /// Hands the batch over; with a spool and no room in the queue, spools it here.
    /// The batch is left empty unless neither worked.
    fn flush(&self, b: &mut Batch) {
        if self.hand_over(b) {
            return;
        }
        let Some(overflow) = &self.sink.overflow else {
            return;
        };
        match overflow.write(&b.lines) {
            Ok(()) => {
                self.sink
                    .metrics
                    .overflowed
                    .fetch_add(b.records as u64, Relaxed);
                b.lines.clear();
                b.records = 0;
                if self.overflow_failing.replace(false) {
                    info!("usage spool: workers can write overflow files again");
                }
            }
            Err(e) => {
                if !self.overflow_failing.replace(true) {
                    error!(
                        "usage queue full and the spool refuses the overflow ({e}); records are held in memory until one takes them"
                    );
                }
            }
        }
    }

    /// Sends the batch to the delivery threads unless the queue is full (then it
    /// stays, and false is returned). A batch always fits an empty queue, so a burst
    /// gathered in one `HANDOVER` passes whatever `queue_size` is.
    fn hand_over(&self, b: &mut Batch) -> bool {
        let Some(tx) = &self.sink.tx else { return true };
        if b.records == 0 {
            return true;
        }
        let queued = &self.sink.queued;
        let before = queued.load(Relaxed);
        if before > 0 && before + b.records > self.sink.limit {
            return false;
        }
        queued.fetch_add(b.records, Relaxed);
        let next = Batch::with_capacity(b.lines.capacity().min(2 * BATCH_BYTES));
        match tx.try_send(std::mem::replace(b, next)) {
            Ok(()) => true,
            Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => {
                queued.fetch_sub(back.records, Relaxed);
                *b = back;
                false
            }
        }
    }

    /// The worker's hand-over task: parked while the batch is empty, else flushes it
    /// `HANDOVER` after it started (or again each `HANDOVER` while it could not go).
    /// Runs until the worker's runtime ends; `finish` takes the rest.
    pub async fn hand_over_loop(&self) {
        loop {
            std::future::poll_fn(|cx| {
                if self.batch.borrow().records > 0 {
                    Poll::Ready(())
                } else {
                    self.waiting.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            monoio::time::sleep(HANDOVER).await;
            self.flush(&mut self.batch.borrow_mut());
        }
    }

    /// At the worker's end: hands over or spools what is left, else waits for room up
    /// to `FINAL_HANDOVER`; what still cannot go is logged in full and counted.
    pub fn finish(&self) {
        let Some(tx) = &self.sink.tx else { return };
        let mut b = std::mem::replace(&mut *self.batch.borrow_mut(), Batch::with_capacity(0));
        self.flush(&mut b);
        if b.records == 0 {
            return;
        }
        let n = b.records;
        self.sink.queued.fetch_add(n, Relaxed);
        if let Err(e) = tx.send_timeout(b, FINAL_HANDOVER) {
            let b = e.into_inner();
            self.sink.queued.fetch_sub(n, Relaxed);
            self.sink
                .metrics
                .records_dropped
                .fetch_add(n as u64, Relaxed);
            spool::log_undelivered(&b.lines, "usage delivery is not taking records");
        }
    }
}

impl Drop for WorkerSink {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Puts the calling thread in `SCHED_BATCH`: it gets its fair share of the CPU as
/// before, but waking up (for every batch) no longer preempts
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
    let (tx, rx) = crossbeam_channel::bounded(cfg.queue_size.min(MAX_BATCHES));
    let closing = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let outbox = Outbox::new(cfg, metrics.clone());
    let mut handles = Vec::new();
    let mut overflow = None;
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
        let queued_m = queued.clone();
        handles.push(spawn(
            "usage-sender",
            Box::new(move || outbox.run_memory(rx, &queued_m, &stop)),
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
        let o = spool.overflow();
        overflow = Some(o.clone());
        let (stop_w, stop_s) = (closing.clone(), closing.clone());
        let (m, q) = (metrics.clone(), queued.clone());
        handles.push(spawn(
            "usage-spool",
            Box::new(move || write_spool(rx, writer, &o, &m, &q, &stop_w)),
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
            queued,
            limit: cfg.queue_size,
            overflow,
            metrics,
            closing,
        },
        handles,
    ))
}

/// The spool writer thread: channel → disk, one write for whatever batches the workers
/// handed over since the last, one fdatasync per `SYNC_INTERVAL` (and whenever the
/// channel goes quiet).
fn write_spool(
    rx: Receiver<Batch>,
    mut writer: SpoolWriter,
    overflow: &Overflow,
    metrics: &Metrics,
    queued: &AtomicUsize,
    closing: &AtomicBool,
) {
    let mut records = 0u64;
    let mut last_sync = Instant::now();
    // Overflow files from before this start are taken at the first turn.
    let mut overflow_due = true;
    loop {
        // A write failed with a full buffer: retry it before taking more, so the queue
        // fills and workers hold their batches (memory stays bounded while the disk
        // refuses).
        let backed_up = writer.pending() >= MAX_BATCH_BYTES;
        if backed_up && closing.load(Relaxed) {
            break;
        }
        let first = match backed_up {
            true => None,
            false => match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(b) => Some(b),
                Err(RecvTimeoutError::Timeout) if closing.load(Relaxed) && rx.is_empty() => {
                    break;
                }
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let quiet = first.is_none() && !backed_up;
        let taking = if backed_up { None } else { Some(rx.try_iter()) };
        for b in first.into_iter().chain(taking.into_iter().flatten()) {
            writer.append_lines(&b.lines);
            queued.fetch_sub(b.records, Relaxed);
            records += b.records as u64;
            if writer.pending() >= MAX_BATCH_BYTES {
                break;
            }
        }
        let sync = quiet || last_sync.elapsed() >= SYNC_INTERVAL;
        match writer.write_out(sync) {
            Ok(()) => {
                if sync {
                    last_sync = Instant::now();
                }
                metrics
                    .spooled
                    .fetch_add(std::mem::take(&mut records), Relaxed);
                overflow_due |= overflow.take_written();
                if overflow_due {
                    overflow_due = !take_overflow(&mut writer, metrics);
                }
            }
            Err(e) => {
                // Kept in memory and retried: the queue fills, then workers spool
                // their batches themselves (or, with the disk refusing them too, hold
                // them, then log and count).
                error!("usage spool: write failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    // What workers spooled themselves at their end.
    if writer.pending() == 0 {
        take_overflow(&mut writer, metrics);
    }
    // Stopped with the disk refusing writes: what the writer holds and what is still
    // queued is logged in full and counted, not dropped with the channel.
    let mut lost = writer.close();
    for b in rx.try_iter() {
        queued.fetch_sub(b.records, Relaxed);
        lost += spool::log_undelivered(&b.lines, "usage spool: not written at shutdown");
    }
    metrics.records_dropped.fetch_add(lost, Relaxed);
}

/// Moves the workers' overflow files into the segment; false if that failed (it is
/// tried again at the next turn; the files stay on disk meanwhile).
fn take_overflow(writer: &mut SpoolWriter, metrics: &Metrics) -> bool {
    match writer.take_overflow() {
        Ok(n) => {
            metrics.spooled.fetch_add(n, Relaxed);
            true
        }
        Err(e) => {
            error!("usage spool: cannot take in the workers' overflow files, retrying: {e}");
            false
        }
    }
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
    signer: Option<signing::Signer>,
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
        let mut headers: Vec<(String, String)> = cfg
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Credentials in the URL (`https://user:pw@host/...`) become Basic auth, the
        // same on both clients (the plain one used to drop them without a word); an
        // Authorization header the operator set wins.
        let (url, basic) = split_userinfo(&cfg.url);
        if let Some(basic) = basic
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            headers.push(("authorization".into(), basic));
        }
        // Checked when the config was loaded.
        let signer = cfg
            .signing_secret
            .as_deref()
            .and_then(|s| signing::Signer::parse(s).ok());
        Outbox {
            plain: webhook::PlainHttp::new(&url, &headers, signer.clone(), cfg.timeout.0),
            pipeline: cfg.pipeline.max(1),
            agent,
            url,
            headers,
            signer,
            retries: cfg.retry,
            metrics,
            rng: seed | 1,
        }
    }

    fn run_memory(mut self, rx: Receiver<Batch>, queued: &AtomicUsize, closing: &AtomicBool) {
        loop {
            let batch = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) if closing.load(Relaxed) => break,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            queued.fetch_sub(batch.records, Relaxed);
            for line in batch.lines.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
                let id = record_id(line);
                match self.deliver(line, &id) {
                    Delivery::Delivered => {}
                    Delivery::Refused(status, excerpt) => {
                        self.metrics.dead_letter.fetch_add(1, Relaxed);
                        error!(
                            "usage webhook refused {id} with {status} ({excerpt}); no spool; UNDELIVERED RECORD: {}",
                            String::from_utf8_lossy(line)
                        );
                    }
                    Delivery::Failed(why) => {
                        self.metrics.records_dropped.fetch_add(1, Relaxed);
                        error!(
                            "usage webhook: giving up on {id} ({why}); no spool; UNDELIVERED RECORD: {}",
                            String::from_utf8_lossy(line)
                        );
                    }
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
        if let Some(signer) = &self.signer {
            let now = signing::unix_now();
            req = req
                .header("webhook-id", request_id)
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", signer.signature(request_id, now, body));
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

/// The URL without its userinfo, and that userinfo as a Basic `Authorization` value
/// (percent-escapes in it decoded, as RFC 3986 writes reserved characters there).
fn split_userinfo(url: &str) -> (String, Option<String>) {
    use base64::Engine;
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some((userinfo, host)) = rest[..end].rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let decoded: Vec<u8> = {
        let b = userinfo.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b[i],
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                (c, _, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        out
    };
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(decoded)
    );
    (format!("{scheme}://{host}{}", &rest[end..]), Some(basic))
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
    let metrics = Arc::new(Metrics::new(1));
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
    use crate::usage::record::{Outcome, UsageSource};

    fn record(id: usize) -> UsageRecord {
        UsageRecord {
            request_id: format!("req-{id}"),
            client_request_id: None,
            user_id: "u".into(),
            api_key: String::new(),
            model: "m".into(),
            usage: Default::default(),
            is_stream: false,
            endpoint: "/v1/chat/completions".into(),
            timestamp: SystemTime::now(),
            backend_url: Arc::from("http://b"),
            status_code: 200,
            outcome: Outcome::Completed,
            usage_source: UsageSource::Backend,
            duration_ms: 1,
            ttft_ms: None,
        }
    }

    fn ids(b: &Batch) -> Vec<String> {
        let ids: Vec<String> = b
            .lines
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                v["request_id"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(ids.len(), b.records);
        ids
    }

    #[test]
    fn a_worker_holds_its_batch_while_the_queue_is_full_and_drops_only_beyond_it() {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let metrics = Arc::new(Metrics::new(1));
        let sink = RecordSink {
            tx: Some(tx),
            queued: Arc::new(AtomicUsize::new(0)),
            limit: 3,
            overflow: None,
            metrics: metrics.clone(),
            closing: Arc::new(AtomicBool::new(false)),
        };
        let w = sink.worker(metrics.claim(0).expect("shard"));
        w.emit(&record(0));
        w.emit(&record(1));
        assert!(w.hand_over(&mut w.batch.borrow_mut()));
        assert_eq!(sink.queue_depth(), 2);
        // 2 queued + 1 held would pass queue_size 3 no more; 2 held would: kept.
        w.emit(&record(2));
        w.emit(&record(3));
        assert!(!w.hand_over(&mut w.batch.borrow_mut()));
        w.emit(&record(4));
        // The worker holds queue_size records: the next is logged and counted.
        w.emit(&record(5));
        assert_eq!(metrics.records_dropped.load(Relaxed), 1);
        assert_eq!(metrics.records_emitted(), 6);
        // The writer takes the first batch; the held one goes next.
        let first = rx.try_recv().unwrap();
        sink.queued.fetch_sub(first.records, Relaxed);
        assert_eq!(ids(&first), ["req-0", "req-1"]);
        assert!(w.hand_over(&mut w.batch.borrow_mut()));
        let held = rx.try_recv().unwrap();
        assert_eq!(ids(&held), ["req-2", "req-3", "req-4"]);
        assert_eq!(sink.queue_depth(), 3);
        // What a worker has at its end goes too, whatever the queue holds.
        w.emit(&record(6));
        drop(w);
        assert_eq!(ids(&rx.try_recv().unwrap()), ["req-6"]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn with_a_spool_a_full_queue_sends_batches_to_overflow_files_and_none_is_dropped() {
        crate::testing::clean_at_exit();
        let d = std::env::temp_dir().join(format!("llmproxy-overflow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let spool = Spool::open(&d).unwrap();
        // queue_size 1, and a channel nobody reads yet: a stalled writer.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let metrics = Arc::new(Metrics::new(1));
        let sink = RecordSink {
            tx: Some(tx),
            queued: Arc::new(AtomicUsize::new(0)),
            limit: 1,
            overflow: Some(spool.overflow()),
            metrics: metrics.clone(),
            closing: Arc::new(AtomicBool::new(false)),
        };
        let w = sink.worker(metrics.claim(0).expect("shard"));
        // A burst: the first batch fits the empty queue whatever its size, the next
        // ones go to overflow files.
        for burst in 0..4 {
            for i in 0..5 {
                w.emit(&record(burst * 5 + i));
            }
            w.flush(&mut w.batch.borrow_mut());
            assert_eq!(w.batch.borrow().records, 0);
        }
        w.emit(&record(20));
        drop(w); // its end: the last record goes to overflow too
        assert_eq!(metrics.records_dropped.load(Relaxed), 0);
        assert_eq!(metrics.overflowed.load(Relaxed), 16);
        let queued = rx.try_recv().unwrap();
        assert_eq!(ids(&queued).len(), 5);
        // The writer takes the overflow files into its segment, oldest first.
        let mut writer = spool.writer().unwrap();
        assert_eq!(writer.take_overflow().unwrap(), 16);
        let mut reader = spool.reader();
        let mut got = Vec::new();
        while let Next::Record(line) = reader.next(Duration::ZERO) {
            got.push(record_id(&line).into_owned());
            reader.ack();
        }
        let want: Vec<String> = (5..21).map(|i| format!("req-{i}")).collect();
        assert_eq!(got, want);
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("overflow-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_spool_that_cannot_write_stops_taking_batches_and_logs_what_it_holds() {
        crate::testing::clean_at_exit();
        let d = std::env::temp_dir().join(format!("llmproxy-stuck-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let spool = Spool::open(&d).unwrap();
        let mut writer = spool.writer().unwrap();
        writer.fail_writes().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(16);
        let queued = Arc::new(AtomicUsize::new(0));
        let closing = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::new(1));
        let big = |id: usize| {
            let mut b = Batch::with_capacity(0);
            record(id).write_json(&mut b.lines);
            b.lines.resize(600 * 1024, b' ');
            b.lines.push(b'\n');
            b.records = 1;
            b
        };
        for id in 0..3 {
            tx.send(big(id)).unwrap();
            queued.fetch_add(1, Relaxed);
        }
        let t = {
            let (q, c, m) = (queued.clone(), closing.clone(), metrics.clone());
            let o = spool.overflow();
            std::thread::spawn(move || write_spool(rx, writer, &o, &m, &q, &c))
        };
        // Two batches fill the writer's buffer; the failed write is retried, and the
        // third batch stays queued for as long as the disk refuses.
        let end = Instant::now() + Duration::from_secs(10);
        while queued.load(Relaxed) > 1 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(500)); // two more failed retries
        assert_eq!(queued.load(Relaxed), 1);
        assert_eq!(tx.len(), 1);
        assert_eq!(metrics.spooled.load(Relaxed), 0);
        closing.store(true, Relaxed);
        t.join().unwrap();
        // Shut down with the disk still refusing: the two held and the one queued are
        // logged and counted as dropped, none vanishes with the channel.
        assert_eq!(metrics.records_dropped.load(Relaxed), 3);
        assert_eq!(queued.load(Relaxed), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

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
    fn credentials_in_the_webhook_url_become_basic_auth() {
        assert_eq!(
            split_userinfo("https://billing:p%40ss@bill.example:8443/hook?x=1"),
            (
                "https://bill.example:8443/hook?x=1".to_string(),
                Some("Basic YmlsbGluZzpwQHNz".to_string())
            )
        );
        assert_eq!(
            split_userinfo("http://h:1/a@b"),
            ("http://h:1/a@b".into(), None)
        );
        assert_eq!(split_userinfo("http://h"), ("http://h".into(), None));
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
