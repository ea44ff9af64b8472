//! A worker's hand-over of its usage records to the delivery threads. With a spool,
//! records go into the worker's staging ring (`stage`: in the page cache at once, no
//! wake-up); otherwise, and when the ring is full, they are serialized on the worker
//! into a batch, handed to a bounded channel every `HANDOVER`, and spooled by the
//! worker itself when the channel is full (see `WorkerSink`).

use super::spool::{self, Overflow};
use super::stage::{Ring, Rings};
use crate::metrics::{Metrics, WorkerMetrics};
use crate::usage::UsageRecord;
use crossbeam_channel::{Sender, TrySendError};
use log::{error, info};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Poll, Waker};
use std::thread::Thread;
use std::time::Duration;

/// How long a worker gathers records after the first before handing them over; the
/// spool writer writes them at once (then they survive a proxy crash). Part of the
/// durability window.
pub(super) const HANDOVER: Duration = Duration::from_millis(5);
/// A worker hands its batch over early once it holds this many bytes.
pub(super) const BATCH_BYTES: usize = 256 * 1024;
/// Most bytes a worker holds while neither the queue nor the spool takes its batch (a
/// disk that refuses writes); beyond it records are logged in full and counted.
pub(super) const MAX_HELD_BYTES: usize = 4 * BATCH_BYTES;
/// At a worker's end, how long its last batch may wait for room in the queue.
pub(super) const FINAL_HANDOVER: Duration = Duration::from_secs(5);

/// The shared side, held by the server: makes each worker's `WorkerSink`, reports the
/// queue depth, and tells the delivery threads to finish.
#[derive(Clone)]
pub struct RecordSink {
    pub(super) tx: Option<Sender<Batch>>,
    /// Records in batches handed over and not yet taken by a delivery thread.
    pub(super) queued: Arc<AtomicUsize>,
    /// `usage_hook.queue_size`.
    pub(super) limit: usize,
    /// With a spool: where a worker writes a batch the queue has no room for.
    pub(super) overflow: Option<Arc<Overflow>>,
    /// With a spool: the workers' staging rings (`stage`), the usual way records go.
    pub(super) rings: Option<Arc<Rings>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) closing: Arc<AtomicBool>,
    /// The thread that takes batches from the channel (the spool writer), unparked
    /// after each hand-over: it waits parked rather than in the channel's `recv`,
    /// whose spin-then-yield before blocking cost a context switch with the worker
    /// per yield on a shared core.
    pub(super) taker: Arc<OnceLock<Thread>>,
}

/// Records a worker serialized, handed to the delivery threads together.
pub struct Batch {
    /// Spool lines: each record's JSON and a newline.
    pub(super) lines: Vec<u8>,
    pub(super) records: usize,
}

impl Batch {
    pub(super) fn with_capacity(bytes: usize) -> Self {
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
            rings: None,
            metrics,
            closing: Arc::new(AtomicBool::new(false)),
            taker: Arc::default(),
        }
    }

    /// Records handed over and not yet taken by the delivery threads.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Relaxed) + self.rings.as_ref().map_or(0, |r| r.depth() as usize)
    }

    /// Tells the delivery threads to spool or deliver what is queued and stop. Call
    /// once the workers are done.
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
        // The writer may be asleep for long (`writer::WATCHED_TURN`).
        if let Some(t) = self.taker.get() {
            t.unpark();
        }
    }

    /// One worker's sink; run its `hand_over_loop` as a task on that worker.
    pub fn worker(&self, stats: WorkerMetrics) -> WorkerSink {
        WorkerSink {
            sink: self.clone(),
            stats,
            batch: RefCell::new(Batch::with_capacity(0)),
            ring: self.rings.as_ref().and_then(|r| r.add()),
            line: RefCell::new(Vec::new()),
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
    pub(super) batch: RefCell<Batch>,
    /// With a spool, the worker's staging ring: a record goes there (no hand-over, no
    /// wake-up) unless it is full, then into `batch` as without one.
    ring: Option<Arc<Ring>>,
    /// The record being pushed to the ring, serialized (a buffer reused).
    line: RefCell<Vec<u8>>,
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
        // The ring while nothing waits in the batch (then records keep their order).
        if let Some(ring) = &self.ring
            && b.records == 0
        {
            let mut line = self.line.borrow_mut();
            line.clear();
            record.write_json(&mut line);
            line.push(b'\n');
            if let Some(half_full) = ring.push(&line) {
                if half_full && let Some(t) = self.sink.taker.get() {
                    t.unpark();
                }
                return;
            }
            // Full: the writer is behind; the batch (and the queue) take it.
        }
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
    pub(super) fn flush(&self, b: &mut Batch) {
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
                // The writer takes the file in at its next turn: now.
                if let Some(t) = self.sink.taker.get() {
                    t.unpark();
                }
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
    pub(super) fn hand_over(&self, b: &mut Batch) -> bool {
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
            Ok(()) => {
                if let Some(t) = self.sink.taker.get() {
                    t.unpark();
                }
                true
            }
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
