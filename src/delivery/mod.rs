//! Delivery of usage records to billing. Each worker serializes its records into a
//! batch and hands it to a bounded channel with `try_send` every `HANDOVER` (a worker
//! never waits). With a spool (the default), a writer thread appends every batch to
//! disk as it comes, before anything tries to deliver its records
//! (fdatasync'd once a record is `SYNC_INTERVAL` old and still undelivered), and a sender thread POSTs spooled records
//! oldest first, advancing the spool cursor only once the webhook took a record (2xx)
//! or refused it for good (4xx other than 408/429: dead letter). While the webhook is
//! down, records wait on disk, also across restarts and crashes. POSTs are pipelined
//! on one connection, at most `usage_hook.pipeline` in flight: a recovering receiver
//! gets a bounded load from each proxy. Records usually reach the writer through the
//! workers' staging rings (`stage`); while the spool is delivered and the webhook keeps
//! up, the sender takes the rings instead and POSTs their records straight from there,
//! handing them back to the writer when a delivery fails.
//!
//! Without a spool (`spool_dir: ""`) the sender reads the channel directly and a
//! record that exhausts its retries is logged in full and counted, nothing more.
//!
//! Files: `handover` (the workers' side), `writer` (the spool writer thread), `sender`
//! (the webhook sender thread, retries), `replay` (the dead-letter command), `spool`
//! (the files on disk), `webhook` (the pipelining client), `signing`.

mod amqp;
mod handover;
mod replay;
mod sender;
pub mod signing;
pub mod spool;
mod stage;
/// The sender's take, named for the billing benches (`benches/core.rs`).
pub use stage::SenderTake;
pub mod webhook;
mod writer;

pub use handover::{Batch, RecordSink, WorkerSink};
pub use replay::replay_dead;

use crate::config::UsageHookConfig;
use crate::metrics::Metrics;
use log::{info, warn};
use sender::Outbox;
use spool::Spool;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::thread::JoinHandle;
use writer::write_spool;

/// Most batches in the channel; records are bounded by `queue_size` separately.
const MAX_BATCHES: usize = 4096;

/// Puts the calling thread in `SCHED_BATCH`: it gets its fair share of the CPU as
/// before, but waking up (for every batch) no longer preempts
/// a worker in the middle of its requests; it runs when the worker's slice ends or
/// the worker waits. Unlike `SCHED_IDLE` it cannot be starved, so records still flow
/// under full load. Best effort: on failure the thread keeps the normal policy.
fn no_wakeup_preemption() {
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid param
    // struct; SCHED_BATCH requires priority 0.
    let done = unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) == 0
    };
    if !done {
        warn!(
            "cannot put the delivery thread in SCHED_BATCH ({}): its wake-ups may preempt workers",
            std::io::Error::last_os_error()
        );
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
    let taker: Arc<std::sync::OnceLock<std::thread::Thread>> = Arc::default();
    let outbox = Outbox::new(cfg, metrics.clone());
    let mut handles = Vec::new();
    let mut overflow = None;
    let mut rings = None;
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
        let r = spool.rings();
        rings = Some(r.clone());
        let (stop_w, stop_s) = (closing.clone(), closing.clone());
        let rings_s = r.clone();
        let (m, q) = (metrics.clone(), queued.clone());
        let spool_writer = spawn(
            "usage-spool",
            Box::new(move || write_spool(rx, writer, &o, &r, &m, &q, &stop_w)),
        )?;
        let _ = taker.set(spool_writer.thread().clone());
        rings_s.set_writer(spool_writer.thread().clone());
        handles.push(spool_writer);
        let dir = spool.dir.clone();
        let keep = Arc::new(spool); // holds the directory lock while the threads run
        handles.push(spawn(
            "usage-sender",
            Box::new(move || {
                outbox.run_spool(reader, Some(rings_s), &dir, &stop_s);
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
            rings,
            metrics,
            closing,
            taker,
        },
        handles,
    ))
}

#[cfg(test)]
mod tests {
    use super::sender::{record_id, record_time_ms};
    use super::spool::{Next, Spool};
    use super::*;
    use crate::usage::UsageRecord;
    use crate::usage::record::{Outcome, UsageSource};
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::{Duration, Instant, SystemTime};

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
            rings: None,
            metrics: metrics.clone(),
            closing: Arc::new(AtomicBool::new(false)),
            taker: Arc::default(),
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
            rings: None,
            metrics: metrics.clone(),
            closing: Arc::new(AtomicBool::new(false)),
            taker: Arc::default(),
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
            let (o, r) = (spool.overflow(), spool.rings());
            std::thread::spawn(move || write_spool(rx, writer, &o, &r, &m, &q, &c))
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
    fn record_time_reads_the_timestamp() {
        assert_eq!(
            record_time_ms(br#"{"request_id":"a","timestamp":"1970-01-01T00:00:01.500Z"}"#),
            1500
        );
        assert_eq!(record_time_ms(br#"{"timestamp":"soon"}"#), 0);
    }
}
