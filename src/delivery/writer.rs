//! The spool writer thread: batches from the channel to the spool segment on disk,
//! the workers' overflow files taken in, one fdatasync per `SYNC_INTERVAL`.

use super::handover::Batch;
use super::spool::{self, Overflow, SpoolWriter};
use crate::metrics::Metrics;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::error;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Most bytes the writer buffers before a commit (one fsync covers them all).
pub(super) const MAX_BATCH_BYTES: usize = 1 << 20;
/// Longest a written record waits for fdatasync (then it survives power loss). An
/// fdatasync costs ~100 us of CPU here; one per 5 ms window was half the billing cost
/// at moderate rates.
pub(super) const SYNC_INTERVAL: Duration = Duration::from_millis(50);

/// The spool writer thread: channel → disk, one write for whatever batches the workers
/// handed over since the last, one fdatasync per `SYNC_INTERVAL` (and whenever the
/// channel goes quiet).
pub(super) fn write_spool(
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
