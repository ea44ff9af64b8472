//! The spool writer thread: batches from the channel to the spool segment on disk,
//! the workers' overflow files taken in, one fdatasync per `SYNC_INTERVAL`.

use super::handover::Batch;
use super::spool::{self, Overflow, SpoolWriter};
use super::stage::{RING_IDLE_TURN, RING_TURN, Rings};
use crate::metrics::Metrics;
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use log::error;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Most bytes the writer buffers before a commit (one fsync covers them all).
pub(super) const MAX_BATCH_BYTES: usize = 1 << 20;
/// Longest a written record that is not delivered yet waits for fdatasync (then it
/// survives power loss). An fdatasync costs ~100-350 us of CPU here (two writes to a
/// virtual disk, each a VM exit); one per 5 ms window was half the billing cost at
/// moderate rates, and one per 50 ms still 2 us a request at 2,000 req/s.
pub(super) const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// Longest the writer waits for a batch before it looks again at what needs a sync,
/// while a write waits for one (with none, the ring turn decides).
const IDLE_TURN: Duration = Duration::from_millis(50);
/// Longest the writer sleeps while the sender takes the rings and watches its own
/// takes (`Rings::watched_by_sender`): everything it has to do then comes with a
/// wake-up (a batch, a ring half full, the rings given back, the stop), so this only
/// bounds what a missed one could delay.
const WATCHED_TURN: Duration = Duration::from_secs(1);
/// At shutdown, how long the writer waits for the sender to give the rings back
/// (it settles its round first) before leaving their records to the next start.
const RINGS_BACK_WAIT: Duration = Duration::from_secs(30);

/// The writes since the last fdatasync, oldest first: when each was made and its bytes.
/// A record needs the sync only if it is still undelivered `SYNC_INTERVAL` after it was
/// written: a webhook that keeps up takes records within ~15 ms, and a delivered
/// record needs no disk (its cursor may be lost with power: then it is delivered again,
/// with the same Idempotency-Key). So a healthy pipeline makes no fdatasync at all, and
/// a slow or down webhook gets one per `SYNC_INTERVAL`, as before.
#[derive(Default)]
pub(super) struct Unsynced {
    writes: VecDeque<(Instant, u64)>,
}

impl Unsynced {
    pub(super) fn wrote(&mut self, at: Instant, bytes: u64) {
        if bytes > 0 {
            self.writes.push_back((at, bytes));
        }
    }

    /// Whether a write made `SYNC_INTERVAL` ago or earlier still holds an undelivered
    /// record. `backlog` is the spooled bytes not yet delivered: the spool is delivered
    /// oldest first, so the old writes are all delivered exactly when the backlog fits
    /// in the bytes written after them (the young writes). Old writes found delivered
    /// are forgotten.
    pub(super) fn due(&mut self, now: Instant, backlog: u64) -> bool {
        let old = |at: &Instant| now.saturating_duration_since(*at) >= SYNC_INTERVAL;
        if !self.writes.front().is_some_and(|(at, _)| old(at)) {
            return false;
        }
        let young: u64 = self
            .writes
            .iter()
            .filter(|(at, _)| !old(at))
            .map(|(_, n)| n)
            .sum();
        if backlog > young {
            return true;
        }
        self.writes.retain(|(at, _)| !old(at));
        false
    }

    /// How long until the oldest write turns `SYNC_INTERVAL` old; `Duration::MAX`
    /// when no write waits for a sync (an idle writer then wakes once a ring turn, not
    /// every `IDLE_TURN`: half the wake-ups, ~0.05 us a request at 2,000 req/s).
    pub(super) fn wait(&self, now: Instant) -> Duration {
        self.writes.front().map_or(Duration::MAX, |(at, _)| {
            (*at + SYNC_INTERVAL)
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), IDLE_TURN)
        })
    }

    pub(super) fn synced(&mut self) {
        self.writes.clear();
    }
}

/// The spool writer thread: channel → disk, one write for whatever batches the workers
/// handed over since the last, an fdatasync when a record is still undelivered
/// `SYNC_INTERVAL` after its write (see `Unsynced`).
pub(super) fn write_spool(
    rx: Receiver<Batch>,
    mut writer: SpoolWriter,
    overflow: &Overflow,
    rings: &Rings,
    metrics: &Metrics,
    queued: &AtomicUsize,
    closing: &AtomicBool,
) {
    let mut records = 0u64;
    let mut unsynced = Unsynced::default();
    let mut ring_turn = RING_IDLE_TURN;
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
            // While records come, every ring turn looks at what needs a sync too (no
            // wake-up of its own for each write turning SYNC_INTERVAL old: that
            // doubled the turns); when they stop, the oldest write's age decides.
            false => match take(&rx, turn_wait(&unsynced, ring_turn)) {
                Ok(b) => Some(b),
                Err(RecvTimeoutError::Timeout) if closing.load(Relaxed) && rx.is_empty() => {
                    break;
                }
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let taking = if backed_up { None } else { Some(rx.try_iter()) };
        for b in first.into_iter().chain(taking.into_iter().flatten()) {
            writer.append_lines(&b.lines);
            queued.fetch_sub(b.records, Relaxed);
            records += b.records as u64;
            if writer.pending() >= MAX_BATCH_BYTES {
                break;
            }
        }
        if !backed_up && rings.sender_takes() {
            // The sender takes the rings. The writer wakes it for a ring filling up,
            // and fdatasyncs the rings for a take stuck in one POST round (one held
            // long between rounds, the sender writes to `held.jsonl` itself) unless
            // the sender does so while it waits.
            rings.sync_if_late(2 * SYNC_INTERVAL);
            if rings.half_untaken() {
                writer.wake_reader();
            }
            ring_turn = match rings.watched_by_sender() && !overflow_due {
                true => WATCHED_TURN,
                false => RING_IDLE_TURN,
            };
        } else if !backed_up {
            let from_rings = writer.append_from(|buf| rings.take(buf));
            records += from_rings;
            ring_turn = if from_rings > 0 {
                RING_TURN
            } else {
                RING_IDLE_TURN
            };
        }
        let now = Instant::now();
        let bytes = writer.pending() as u64;
        let sync = unsynced.due(now, writer.backlog());
        match writer.write_out(sync) {
            Ok(()) => {
                if !rings.sender_takes() {
                    rings.release();
                    // The sender has delivered the spool: it takes the rings' records
                    // from now on (what this turn wrote, it reads first).
                    if !closing.load(Relaxed) && rings.hand_to_sender() {
                        writer.wake_reader();
                    }
                }
                unsynced.wrote(now, bytes);
                if writer.synced() {
                    unsynced.synced();
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
    // What the workers' rings still hold (they are done), and what they spooled
    // themselves at their end. The sender gives the rings back at its next turn.
    let end = Instant::now() + RINGS_BACK_WAIT;
    while rings.sender_takes() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rings_back = !rings.sender_takes();
    if !rings_back {
        rings.sync_all();
        error!(
            "usage spool: the sender did not give the staging rings back within {RINGS_BACK_WAIT:?}; what they hold is delivered at the next start"
        );
    }
    if writer.pending() == 0 {
        let from_rings = match rings_back {
            true => writer.append_from(|buf| rings.take(buf)),
            false => 0,
        };
        match writer.write_out(true) {
            Ok(()) if !rings_back => {}
            Ok(()) => {
                rings.release();
                rings.remove_files();
                metrics.spooled.fetch_add(from_rings, Relaxed);
            }
            Err(e) => {
                // They stay in the ring files, which the next start takes in.
                error!(
                    "usage spool: final write failed ({e}); the records stay in the staging rings for the next start"
                );
                writer.discard_pending();
            }
        }
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

/// How long the writer may sleep: a ring turn while records come, else until the
/// oldest unsynced write turns `SYNC_INTERVAL` old (or the idle ring turn).
fn turn_wait(unsynced: &Unsynced, ring_turn: Duration) -> Duration {
    if ring_turn == RING_TURN {
        RING_TURN
    } else {
        unsynced.wait(Instant::now()).min(ring_turn)
    }
}

/// The next batch, waiting up to `wait` parked: a worker unparks this thread after
/// each hand-over (`RecordSink::taker`), and for anything else the writer should look
/// at now (a ring half full, the rings given back, the stop): an unpark with no batch
/// ends the wait too (`Timeout`). Unlike the channel's `recv_timeout`, no spin and no
/// `sched_yield` before sleeping: on the worker's core each yield was a switch to the
/// worker and back (~580 a second at 2,000 req/s).
fn take(rx: &Receiver<Batch>, wait: Duration) -> Result<Batch, RecvTimeoutError> {
    match rx.try_recv() {
        Ok(b) => return Ok(b),
        Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
        Err(TryRecvError::Empty) => {}
    }
    std::thread::park_timeout(wait);
    rx.try_recv().map_err(|e| match e {
        TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
        TryRecvError::Empty => RecvTimeoutError::Timeout,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_record_delivered_within_the_interval_needs_no_sync() {
        let t0 = Instant::now();
        let mut u = Unsynced::default();
        u.wrote(t0, 100);
        u.wrote(t0 + 10 * MS, 50);
        // Not old yet: never due, whatever the backlog.
        assert!(!u.due(t0 + 49 * MS, 150));
        // The first write is old and delivered (the backlog is the second's 50 bytes):
        // no sync, and it is forgotten.
        assert!(!u.due(t0 + 55 * MS, 50));
        assert_eq!(u.writes.len(), 1);
        // The second turns old undelivered: due.
        assert!(u.due(t0 + 61 * MS, 50));
        u.synced();
        assert!(!u.due(t0 + 200 * MS, 1_000));
    }

    #[test]
    fn an_undelivered_old_write_is_due_even_behind_an_older_backlog() {
        let t0 = Instant::now();
        let mut u = Unsynced::default();
        // 1,000 bytes from before the last sync are still undelivered (webhook down).
        u.wrote(t0, 100);
        u.wrote(t0 + 40 * MS, 100);
        assert!(u.due(t0 + 50 * MS, 1_200));
        // Part of the first write delivered: still due.
        assert!(u.due(t0 + 50 * MS, 101));
        // Exactly the young write left: the old one is delivered.
        assert!(!u.due(t0 + 50 * MS, 100));
    }

    #[test]
    fn the_wait_ends_when_the_oldest_write_turns_old() {
        let t0 = Instant::now();
        let mut u = Unsynced::default();
        assert_eq!(u.wait(t0), Duration::MAX);
        u.wrote(t0, 1);
        assert_eq!(u.wait(t0 + 20 * MS), 30 * MS);
        assert_eq!(u.wait(t0 + 80 * MS), MS);
        u.wrote(t0, 0);
        assert_eq!(u.writes.len(), 1);
    }
}
