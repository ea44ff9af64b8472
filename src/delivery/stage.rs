//! A worker's staging ring: a file in the spool dir, mapped shared, that the worker
//! appends its serialized records to and the spool writer takes them from.
//!
//! Why: handing records over through the channel woke the spool writer once per
//! `HANDOVER` (5 ms, the crash window): ~200 wake-ups a second at moderate rates, each
//! ~35 us of CPU plus the write on the worker's core, the largest share of billing's
//! cost at 2,000 req/s. A record copied into a shared file mapping is in the page cache
//! at once: it survives the proxy crashing (`kill -9`) with no syscall and no thread
//! woken. The writer takes what the rings hold on its own cadence (`RING_TURN`) and
//! writes it to the segment as before. A worker wakes the writer only when its ring
//! passes half full; a full ring sends the worker back to the channel.
//!
//! One producer (the worker) and one consumer (the writer thread) per ring. Positions
//! are byte counts since the ring was made (`head`: published by the worker after the
//! record's bytes; `tail`: released by the writer once the bytes are in the segment),
//! both in the file's first page so that a new start can take what a crashed one left
//! (`recover`). Records are whole lines: `[tail, head)` is always a run of complete
//! records, wrapping at the end of the data area.
//!
//! Who takes a ring's records is one thread at a time (`Rings::taker`): the spool writer,
//! which writes them to the segment, or, while the spool is delivered and the webhook
//! keeps up, the sender, which POSTs them straight from the rings and releases each
//! record's room once the webhook took it (no segment write, no read-back). A sender
//! that cannot deliver hands what it has not released back to the writer (`settle`).
//!
//! The file's blocks are allocated up front (`fallocate`), so writing into the mapping
//! cannot fail for lack of space (which would be a SIGBUS); where that is not possible
//! the worker uses the channel. Nothing else may truncate files in the spool dir (the
//! dir is locked to one proxy).

use log::warn;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// Bytes of records a ring holds: ~3,500 records, 100 ms of one worker at saturation.
pub const RING_BYTES: usize = 2 << 20;
/// How often the rings' taker (the writer, or the sender) takes their records while
/// records come, and while none do (the sender also after a small take: a low rate,
/// `sender::BUSY_TAKE`). A record in a ring already survives a crash; the turn bounds
/// how late it reaches the segment or the webhook, and the power-loss window with it.
pub const RING_TURN: Duration = Duration::from_millis(40);
pub const RING_IDLE_TURN: Duration = Duration::from_millis(100);
/// The header page: magic, capacity, head, tail (u64 each).
const HEADER: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"llmpring");

pub struct Ring {
    path: PathBuf,
    /// The mapping: `HEADER` bytes of header, then `cap` bytes of records.
    base: *mut u8,
    cap: u64,
    /// Records pushed (worker) and taken (writer), for the queue depth.
    pushed: AtomicU64,
    taken_records: AtomicU64,
    /// Where the taker's next take starts (it has taken `[tail, taken)` but not
    /// released it: the writer's write, or the sender's POSTs, may still fail).
    taken: AtomicU64,
    file: File,
}

// SAFETY: the mapping is shared memory; `head` is written only by the one worker that
// owns the ring and `tail`/`taken` only by the taker (the writer thread, or the sender
// while `Rings::taker` says so: one at a time), both through atomics,
// and each side touches record bytes only in the range the other has handed to it
// (`push` writes `[head, tail + cap)`, `take` reads `[taken, head)`).
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// Creates (or replaces) the ring file at `path` and maps it.
    pub fn create(path: &Path, cap: usize) -> io::Result<Ring> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let len = (HEADER + cap) as libc::off_t;
        // SAFETY: fallocate and mmap on a file descriptor we own, with checked results.
        let base = unsafe {
            if libc::fallocate(file.as_raw_fd(), 0, 0, len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                HEADER + cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            p.cast::<u8>()
        };
        let ring = Ring {
            path: path.to_path_buf(),
            base,
            cap: cap as u64,
            pushed: AtomicU64::new(0),
            taken_records: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            file,
        };
        ring.word(2).store(0, Ordering::Relaxed);
        ring.word(3).store(0, Ordering::Relaxed);
        ring.word(1).store(cap as u64, Ordering::Relaxed);
        ring.word(0).store(MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// Header word `i` (0 magic, 1 capacity, 2 head, 3 tail).
    fn word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: the header page is mapped for the ring's life, page-aligned, and
        // these words are only ever accessed atomically.
        unsafe { &*self.base.add(i * 8).cast::<AtomicU64>() }
    }

    fn head(&self) -> &AtomicU64 {
        self.word(2)
    }

    fn tail(&self) -> &AtomicU64 {
        self.word(3)
    }

    /// Appends one record (a whole line) if it fits; false if the ring is too full.
    /// The worker's side. Returns `Some(crossed_half)` when pushed: whether the ring
    /// passed half full with it (then the writer should be woken).
    pub fn push(&self, line: &[u8]) -> Option<bool> {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        let used = head - tail;
        let len = line.len() as u64;
        if used + len > self.cap {
            return None;
        }
        let at = (head % self.cap) as usize;
        let first = line.len().min(self.cap as usize - at);
        // SAFETY: `[head, head + len)` lies in `[head, tail + cap)`, which the writer
        // has released; the two copies stay inside the data area.
        unsafe {
            let data = self.base.add(HEADER);
            std::ptr::copy_nonoverlapping(line.as_ptr(), data.add(at), first);
            std::ptr::copy_nonoverlapping(line.as_ptr().add(first), data, line.len() - first);
        }
        self.head().store(head + len, Ordering::Release);
        self.pushed.fetch_add(1, Ordering::Relaxed);
        let half = self.cap / 2;
        Some(used < half && used + len >= half)
    }

    /// Appends what the worker published since the last take to `out` (whole lines);
    /// returns the records taken. The taker's side; `release` once `out` is written.
    pub fn take(&self, out: &mut Vec<u8>) -> u64 {
        let head = self.head().load(Ordering::Acquire);
        let from = self.taken.load(Ordering::Relaxed);
        if head == from {
            return 0;
        }
        if head - from > self.cap {
            // Cannot happen (the worker writes only released room); said, not read.
            warn!(
                "usage spool: {}: head and tail do not add up",
                self.path.display()
            );
            return 0;
        }
        let at = (from % self.cap) as usize;
        let len = (head - from) as usize;
        let first = len.min(self.cap as usize - at);
        let before = out.len();
        // SAFETY: `[from, head)` was published by the worker (Acquire on head) and is
        // not released yet, so the worker does not write there.
        unsafe {
            let data = self.base.add(HEADER);
            out.extend_from_slice(std::slice::from_raw_parts(data.add(at), first));
            out.extend_from_slice(std::slice::from_raw_parts(data, len - first));
        }
        self.taken.store(head, Ordering::Relaxed);
        let n = memchr::memchr_iter(b'\n', &out[before..]).count() as u64;
        self.taken_records.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// The sender's take, in place: what the worker published since the last take is
    /// split into records (`Line`s of part `part`) that point into the ring, except the
    /// one that wraps around the end of the data area, which is copied whole to
    /// `wrapped`. Returns the ring position the take starts at and how many records.
    fn take_in_place(
        &self,
        part: usize,
        lines: &mut Vec<Line>,
        wrapped: &mut Vec<u8>,
    ) -> (u64, u64) {
        let head = self.head().load(Ordering::Acquire);
        let from = self.taken.load(Ordering::Relaxed);
        if head == from || head - from > self.cap {
            if head != from {
                // Cannot happen (the worker writes only released room); said, not read.
                warn!(
                    "usage spool: {}: head and tail do not add up",
                    self.path.display()
                );
            }
            return (from, 0);
        }
        let at = (from % self.cap) as usize;
        let len = (head - from) as usize;
        let first = len.min(self.cap as usize - at);
        // SAFETY: `[from, head)` was published by the worker (Acquire on head) and is
        // not released yet, so the worker does not write there until `settle`.
        let (a, b) = unsafe {
            let data = self.base.add(HEADER);
            (
                std::slice::from_raw_parts(data.add(at), first),
                std::slice::from_raw_parts(data, len - first),
            )
        };
        let before = lines.len();
        let start = push_lines(lines, part, a, at, from);
        let mut bstart = 0;
        if start < a.len()
            && let Some(k) = memchr::memchr(b'\n', b)
        {
            let w = wrapped.len();
            wrapped.extend_from_slice(&a[start..]);
            wrapped.extend_from_slice(&b[..k]);
            lines.push(Line {
                part,
                at: w,
                len: wrapped.len() - w,
                wrapped: true,
                end: from + (first + k) as u64 + 1,
            });
            bstart = k + 1;
        }
        if start == a.len() || bstart > 0 {
            let pos = from + (first + bstart) as u64;
            push_lines(lines, part, &b[bstart..], bstart, pos);
        }
        // Whole lines only: the worker publishes whole records, so the take ends at
        // `head`; were it ever otherwise, the torn rest is left untaken, and said.
        let upto = lines
            .last()
            .filter(|_| lines.len() > before)
            .map_or(from, |l| l.end);
        if upto != head {
            warn!(
                "usage spool: {}: the ring's last record is torn; left in the ring",
                self.path.display()
            );
        }
        self.taken.store(upto, Ordering::Relaxed);
        let n = (lines.len() - before) as u64;
        self.taken_records.fetch_add(n, Ordering::Relaxed);
        (from, n)
    }

    /// Everything taken is in the segment: the worker may reuse its room.
    pub fn release(&self) {
        self.tail()
            .store(self.taken.load(Ordering::Relaxed), Ordering::Release);
    }

    /// The bytes before `pos` (a record boundary between the tail and the last take)
    /// are delivered: the worker may reuse their room. With `hand_back`, what was
    /// taken after `pos` (`records` records) is untaken: the next take starts at `pos`.
    fn settle(&self, pos: u64, hand_back: Option<u64>) {
        self.tail().store(pos, Ordering::Release);
        if let Some(records) = hand_back {
            self.taken.store(pos, Ordering::Relaxed);
            self.taken_records.fetch_sub(records, Ordering::Relaxed);
        }
    }

    /// Whether the worker has filled half the ring or more since the last take.
    fn half_untaken(&self) -> bool {
        let head = self.head().load(Ordering::Relaxed);
        head.saturating_sub(self.taken.load(Ordering::Relaxed)) >= self.cap / 2
    }

    /// Records pushed and not yet taken.
    pub fn depth(&self) -> u64 {
        self.pushed
            .load(Ordering::Relaxed)
            .saturating_sub(self.taken_records.load(Ordering::Relaxed))
    }

    /// Everything pushed was taken and released (written to the segment).
    pub fn drained(&self) -> bool {
        self.tail().load(Ordering::Acquire) == self.head().load(Ordering::Acquire)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `create`; nothing refers to it after.
        unsafe {
            libc::munmap(self.base.cast(), HEADER + self.cap as usize);
        }
    }
}

/// The whole lines of `s`, which starts at offset `at` of a ring's data area and at
/// ring position `pos`, as `Line`s of `part`; returns where the unfinished rest of `s`
/// starts.
fn push_lines(lines: &mut Vec<Line>, part: usize, s: &[u8], at: usize, pos: u64) -> usize {
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', s) {
        lines.push(Line {
            part,
            at: at + start,
            len: nl - start,
            wrapped: false,
            end: pos + nl as u64 + 1,
        });
        start = nl + 1;
    }
    start
}

/// Who takes the rings' records (`Rings::taker`): the writer; the writer, with the
/// sender asking for them; the sender.
const WRITER: u8 = 0;
const ASKED: u8 = 1;
const SENDER: u8 = 2;

/// What the sender took from the rings, read where the workers wrote it: copying a
/// take out of the rings (~2 MiB at saturation) was 12-16 % of the sender's CPU. A
/// record's bytes stay put until the sender settles it (`Rings::settle`, which needs
/// the take mutably, so no record is still borrowed then): the worker writes only
/// released room.
#[derive(Default)]
pub struct SenderTake {
    parts: Vec<Part>,
    lines: Vec<Line>,
    /// The records that wrap around the end of a ring's data area, copied whole (at
    /// most one a ring).
    wrapped: Vec<u8>,
}

/// One ring's share of a take: from ring position `from`, the records `lines`.
struct Part {
    ring: Arc<Ring>,
    from: u64,
    lines: std::ops::Range<usize>,
}

/// One record of a take (without its newline): `len` bytes at `at` of its part's
/// ring data area, or of `wrapped`; `end` is the ring position just past its newline.
#[derive(Clone, Copy)]
struct Line {
    part: usize,
    at: usize,
    len: usize,
    wrapped: bool,
    end: u64,
}

impl SenderTake {
    /// How many records the take holds.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Record `i`, without its newline.
    pub fn line(&self, i: usize) -> &[u8] {
        let l = self.lines[i];
        if l.wrapped {
            return &self.wrapped[l.at..l.at + l.len];
        }
        let ring = &self.parts[l.part].ring;
        // SAFETY: the bytes lie in the ring's data area (`take_in_place`), were
        // published by the worker and are not settled while `self` is borrowed
        // (`Rings::settle` takes it mutably), so the worker does not write them.
        unsafe { std::slice::from_raw_parts(ring.base.add(HEADER + l.at), l.len) }
    }

    /// Records `from..` as JSON Lines, appended to `out`.
    pub fn rest(&self, from: usize, out: &mut Vec<u8>) {
        for i in from..self.len() {
            out.extend_from_slice(self.line(i));
            out.push(b'\n');
        }
    }
}

/// Every worker's ring of this start, for the writer (or the sender) to take from.
pub struct Rings {
    dir: PathBuf,
    /// This start's first segment number: ring names never collide with a crashed
    /// run's (which `Spool::open` takes in first).
    start: u64,
    all: Mutex<Vec<Arc<Ring>>>,
    /// Whether the rings are given up (one could not be made: the workers use the
    /// channel).
    failed: std::sync::atomic::AtomicBool,
    /// Told whether records are staged (`SpoolState::staged`).
    shared: Arc<super::spool::SpoolState>,
    /// `WRITER`, `ASKED` or `SENDER`: the one thread that takes from the rings. The
    /// writer hands them to the sender when the sender asked (it has delivered the
    /// spool) and it holds nothing taken; the sender gives them back when it cannot
    /// deliver (which also withdraws a question the writer has not answered yet), or
    /// at shutdown. Release/Acquire: the positions the one left are the ones the
    /// other sees.
    taker: AtomicU8,
    /// Each ring's data area (`RING_BYTES`; smaller in tests, to wrap often).
    ring_bytes: usize,
    /// While the sender holds records it took and has not settled: when it took them
    /// (ns since `epoch`, never 0), else 0. The sender writes a take it holds long to
    /// `spool::Held` itself (`secured`); one stuck in a POST round, the writer
    /// fdatasyncs with the rings (`sync_if_late`): a power loss cannot lose it.
    sender_took_at: AtomicU64,
    synced_for: AtomicU64,
    /// The sender itself makes a take stuck in a POST round durable (`sync_if_late`,
    /// from its client's waits), so the writer need not wake to look.
    watched: AtomicBool,
    /// The spool writer thread, woken when the rings come back to it.
    writer: OnceLock<Thread>,
    epoch: Instant,
}

impl Rings {
    pub fn new(dir: &Path, start: u64, shared: Arc<super::spool::SpoolState>) -> Rings {
        Rings {
            dir: dir.to_path_buf(),
            start,
            all: Mutex::new(Vec::new()),
            failed: Default::default(),
            shared,
            taker: AtomicU8::new(WRITER),
            ring_bytes: RING_BYTES,
            sender_took_at: AtomicU64::new(0),
            synced_for: AtomicU64::new(0),
            watched: AtomicBool::new(false),
            writer: OnceLock::new(),
            epoch: Instant::now(),
        }
    }

    /// Whether the sender takes the rings' records now (else the writer does).
    pub fn sender_takes(&self) -> bool {
        self.taker.load(Ordering::Acquire) == SENDER
    }

    /// The sender's spool is delivered: it would take the rings' records itself.
    pub fn ask_for_them(&self) {
        let _ = self
            .taker
            .compare_exchange(WRITER, ASKED, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The writer's side, at the end of a turn in which it released all it took: hands
    /// the rings to the sender if it asked. True if it did (then wake the sender).
    pub fn hand_to_sender(&self) -> bool {
        self.taker
            .compare_exchange(ASKED, SENDER, Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }

    /// The sender's side: the writer takes the rings' records (a delivery failed, or
    /// the proxy stops), and a question not answered yet is withdrawn. Call with
    /// nothing taken and unsettled. The writer is woken (it may be sleeping long).
    pub fn give_back(&self) {
        if self.taker.swap(WRITER, Ordering::Release) == SENDER
            && let Some(t) = self.writer.get()
        {
            t.unpark();
        }
    }

    /// The spool writer thread, for `give_back` to wake.
    pub fn set_writer(&self, writer: Thread) {
        let _ = self.writer.set(writer);
    }

    /// The sender's side: it calls `sync_if_late` itself while it waits on a POST
    /// round, so the writer need not (see `watched_by_sender`).
    pub fn sender_watches(&self) {
        self.watched.store(true, Ordering::Relaxed);
    }

    /// Whether the sender makes its stuck takes durable itself; then, while it takes
    /// the rings, the writer sleeps until woken (a batch, a ring half full, the rings
    /// given back, the proxy stopping).
    pub fn watched_by_sender(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// The sender's take: every ring's new records, in `take` (emptied first);
    /// returns how many. Settle them with `settle`.
    pub fn take_for_sender(&self, take: &mut SenderTake) -> u64 {
        take.parts.clear();
        take.lines.clear();
        take.wrapped.clear();
        let Ok(all) = self.all.lock() else {
            return 0;
        };
        let mut records = 0;
        for ring in all.iter() {
            let first = take.lines.len();
            let part = take.parts.len();
            let (from, n) = ring.take_in_place(part, &mut take.lines, &mut take.wrapped);
            if n > 0 {
                records += n;
                take.parts.push(Part {
                    ring: ring.clone(),
                    from,
                    lines: first..take.lines.len(),
                });
            }
        }
        if records > 0 {
            let t = (self.epoch.elapsed().as_nanos() as u64).max(1);
            self.sender_took_at.store(t, Ordering::Relaxed);
        }
        records
    }

    /// The sender is done with the take's first `done` records: their room is
    /// released. With `hand_back`, the rest of the take is untaken: the next take (the
    /// writer's, after `give_back`) starts with it. Without, more of the take is
    /// settled later.
    pub fn settle(&self, take: &mut SenderTake, done: usize, hand_back: bool) {
        for p in &take.parts {
            let upto = done.clamp(p.lines.start, p.lines.end);
            let pos = match upto == p.lines.start {
                true => p.from,
                false => take.lines[upto - 1].end,
            };
            let back = hand_back.then(|| (p.lines.end - upto) as u64);
            p.ring.settle(pos, back);
        }
        if hand_back || done >= take.lines.len() {
            self.sender_took_at.store(0, Ordering::Relaxed);
        }
    }

    /// The sender's side: whether it holds its take now (`true`: from now on, as at a
    /// take) or has it in flight (`false`: POSTed whole, the answers read at its next
    /// turn), which neither `held.jsonl` nor the writer's ring sync counts.
    pub fn holding(&self, yes: bool) {
        let t = match yes {
            true => (self.epoch.elapsed().as_nanos() as u64).max(1),
            false => 0,
        };
        self.sender_took_at.store(t, Ordering::Relaxed);
    }

    /// While the sender takes (called by the writer each turn, or by the sender while
    /// it waits: `watched_by_sender`): a take the sender still holds `after` since it
    /// was made is fdatasync'd (once), so that a power loss cannot lose it while the
    /// webhook is slow to answer.
    pub fn sync_if_late(&self, after: Duration) {
        let took = self.sender_took_at.load(Ordering::Relaxed);
        if took == 0 || self.synced_for.load(Ordering::Relaxed) == took {
            return;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        if now.saturating_sub(took) < after.as_nanos() as u64 {
            return;
        }
        self.synced_for.store(took, Ordering::Relaxed);
        self.sync_all();
    }

    /// Every ring file fdatasync'd (at a stop that leaves records in them).
    pub fn sync_all(&self) {
        if let Ok(all) = self.all.lock() {
            for r in all.iter() {
                if let Err(e) = r.file.sync_data() {
                    warn!("usage spool: cannot sync {}: {e}", r.path.display());
                }
            }
        }
    }

    /// The sender's side: the take it holds is (being) written to disk elsewhere
    /// (`spool::Held`), so the writer need not fdatasync the rings for it; `false`:
    /// that write failed after all.
    pub fn secured(&self, yes: bool) {
        let took = match yes {
            true => self.sender_took_at.load(Ordering::Relaxed),
            false => 0,
        };
        self.synced_for.store(took, Ordering::Relaxed);
    }

    /// Whether a ring is half full of records not taken yet (the sender should take
    /// them now rather than at its next turn).
    pub fn half_untaken(&self) -> bool {
        self.all
            .lock()
            .is_ok_and(|all| all.iter().any(|r| r.half_untaken()))
    }

    /// A new ring for a worker; `None` (logged once) where the file cannot be made.
    pub fn add(&self) -> Option<Arc<Ring>> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        let mut all = self.all.lock().ok()?;
        let path = self
            .dir
            .join(format!("stage-{:020}-{:04}.ring", self.start, all.len()));
        match Ring::create(&path, self.ring_bytes) {
            Ok(r) => {
                let r = Arc::new(r);
                all.push(r.clone());
                self.shared.staged.store(true, Ordering::Relaxed);
                Some(r)
            }
            Err(e) => {
                self.failed.store(true, Ordering::Relaxed);
                self.shared.staged.store(false, Ordering::Relaxed);
                let _ = std::fs::remove_file(&path);
                warn!(
                    "usage spool: cannot make a staging ring in {} ({e}); workers hand records over through the queue instead",
                    self.dir.display()
                );
                None
            }
        }
    }

    /// Takes every ring's new records into `out`; returns how many.
    pub fn take(&self, out: &mut Vec<u8>) -> u64 {
        self.all
            .lock()
            .map_or(0, |all| all.iter().map(|r| r.take(out)).sum())
    }

    /// What was taken is written: the rings' room is free again.
    pub fn release(&self) {
        if let Ok(all) = self.all.lock() {
            all.iter().for_each(|r| r.release());
        }
    }

    /// Records pushed and not yet taken, over all rings.
    pub fn depth(&self) -> u64 {
        self.all
            .lock()
            .map_or(0, |all| all.iter().map(|r| r.depth()).sum())
    }

    /// At a clean stop, everything released: the files go (a next start would find
    /// them empty).
    pub fn remove_files(&self) {
        if let Ok(all) = self.all.lock() {
            for r in all.iter().filter(|r| r.drained()) {
                let _ = std::fs::remove_file(r.path());
            }
        }
    }
}

/// The records a ring file holds that its writer never released (a crash, or a stop
/// with the disk refusing writes): `[tail, head)` as whole lines. `Err` for a file that
/// is not a ring or whose header does not add up (it is then left where it is).
pub fn recover(path: &Path) -> io::Result<Vec<u8>> {
    let data = std::fs::read(path)?;
    let word = |i: usize| {
        data.get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let (magic, cap, head, tail) = (word(0), word(1), word(2), word(3));
    let bad = |why: &str| Err(io::Error::new(io::ErrorKind::InvalidData, why.to_string()));
    if magic != MAGIC {
        return bad("not a staging ring (bad magic)");
    }
    if cap == 0 || data.len() as u64 != HEADER as u64 + cap {
        return bad("its capacity does not match its size");
    }
    if head < tail || head - tail > cap {
        return bad("its head and tail do not add up");
    }
    let records = &data[HEADER..];
    let at = (tail % cap) as usize;
    let len = (head - tail) as usize;
    let first = len.min(cap as usize - at);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&records[at..at + first]);
    out.extend_from_slice(&records[..len - first]);
    if out.last().is_some_and(|&b| b != b'\n') {
        // Cannot happen (head moves by whole lines); said rather than delivered torn.
        warn!(
            "usage spool: {}: the last record is torn; skipped",
            path.display()
        );
        let whole = out.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        out.truncate(whole);
    }
    Ok(out)
}

/// Ring files in `dir` (`stage-*.ring`).
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("stage-") && n.ends_with(".ring"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        crate::testing::clean_at_exit();
        let d = std::env::temp_dir().join(format!("llmproxy-ring-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn line(i: usize, len: usize) -> Vec<u8> {
        let mut l = format!("{{\"request_id\":\"r{i}\",\"pad\":\"").into_bytes();
        while l.len() < len.saturating_sub(3) {
            l.push(b'x');
        }
        l.extend_from_slice(b"\"}\n");
        l
    }

    #[test]
    fn records_wrap_around_the_end_and_come_out_whole_and_in_order() {
        let d = dir("wrap");
        // A small ring and records of varied lengths: every split point of a record
        // across the end of the data area comes up.
        let ring = Ring::create(&d.join("stage-x.ring"), 1000).unwrap();
        let mut want = Vec::new();
        let mut got = Vec::new();
        for i in 0..2000 {
            let l = line(i, 40 + i % 61);
            if ring.push(&l).is_none() {
                assert!(ring.take(&mut got) > 0);
                ring.release();
                ring.push(&l).expect("fits an empty ring");
            }
            want.extend_from_slice(&l);
        }
        ring.take(&mut got);
        ring.release();
        assert_eq!(got, want);
        assert_eq!(ring.depth(), 0);
    }

    #[test]
    fn a_full_ring_refuses_until_released_and_says_when_it_passes_half() {
        let d = dir("full");
        let ring = Ring::create(&d.join("stage-x.ring"), 400).unwrap();
        let l = line(0, 100);
        assert_eq!(ring.push(&l), Some(false));
        assert_eq!(ring.push(&l), Some(true)); // 200 of 400
        assert_eq!(ring.push(&l), Some(false));
        assert_eq!(ring.push(&l), Some(false));
        assert_eq!(ring.push(&l), None);
        let mut out = Vec::new();
        assert_eq!(ring.take(&mut out), 4);
        // Taken but not released (the write may fail): still no room.
        assert_eq!(ring.push(&l), None);
        ring.release();
        assert!(ring.push(&l).is_some());
        assert_eq!(ring.depth(), 1);
    }

    #[test]
    fn what_was_not_released_is_recovered_from_the_file() {
        let d = dir("recover");
        let path = d.join("stage-x.ring");
        let ring = Ring::create(&path, 300).unwrap();
        let mut out = Vec::new();
        for i in 0..4 {
            ring.push(&line(i, 60)).unwrap();
        }
        ring.take(&mut out);
        ring.release();
        // Two more pushed; one taken but not released (a crash mid-write): both come
        // back, wrapped around the end.
        let (a, b) = (line(4, 70), line(5, 70));
        ring.push(&a).unwrap();
        ring.take(&mut Vec::new());
        ring.push(&b).unwrap();
        drop(ring);
        assert_eq!(recover(&path).unwrap(), [a, b].concat());
        std::fs::write(&path, b"not a ring").unwrap();
        assert!(recover(&path).is_err());
        assert_eq!(list(&d), vec![path]);
    }

    #[test]
    fn the_sender_releases_what_was_delivered_and_hands_back_the_rest_whole() {
        let d = dir("sender");
        let rings = Rings::new(&d, 1, Arc::default());
        let (a, b) = (rings.add().unwrap(), rings.add().unwrap());
        let lines: Vec<Vec<u8>> = (0..6).map(|i| line(i, 50 + i * 7)).collect();
        for l in &lines[..3] {
            a.push(l).unwrap();
        }
        for l in &lines[3..] {
            b.push(l).unwrap();
        }
        // Every split of the take: the first `k` records delivered, the rest handed
        // back, across the two rings' parts.
        for k in 0..=6 {
            let mut take = SenderTake::default();
            assert_eq!(rings.take_for_sender(&mut take), 6);
            let mut out = Vec::new();
            take.rest(0, &mut out);
            assert_eq!(out, lines.concat());
            assert_eq!(rings.depth(), 0);
            // Settled round by round, then the rest handed back; until settled, a
            // record stays in its ring's file.
            rings.settle(&mut take, k / 2, false);
            let held = [recover(a.path()).unwrap(), recover(b.path()).unwrap()].concat();
            assert_eq!(held, lines[k / 2..].concat(), "k={k}");
            rings.settle(&mut take, k, k < 6);
            // What a crash now leaves is exactly what was not delivered.
            let left = [recover(a.path()).unwrap(), recover(b.path()).unwrap()].concat();
            assert_eq!(left, lines[k..].concat(), "k={k}");
            assert_eq!(rings.depth(), (6 - k) as u64);
            // The writer takes the rest, once; then the rings are put back as they were.
            rings.give_back();
            assert!(!rings.sender_takes());
            let mut again = Vec::new();
            assert_eq!(rings.take(&mut again), (6 - k) as u64);
            assert_eq!(again, lines[k..].concat());
            rings.release();
            assert!(a.drained() && b.drained());
            for l in &lines[..3] {
                a.push(l).unwrap();
            }
            for l in &lines[3..] {
                b.push(l).unwrap();
            }
        }
    }

    #[test]
    fn the_sender_reads_records_in_place_whole_at_every_wrap_and_settles_each_prefix() {
        let d = dir("inplace");
        let mut rings = Rings::new(&d, 1, Arc::default());
        // A small data area and records of varied lengths: every split point of a
        // record (its newline included) across the end comes up, in both rings.
        rings.ring_bytes = 1000;
        let (a, b) = (rings.add().unwrap(), rings.add().unwrap());
        let mut take = SenderTake::default();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let mut splits = std::collections::BTreeSet::new();
        let mut i = 0;
        for round in 0..1500 {
            // Fill both rings as far as they go, a different count each round.
            for (ring, n) in [(&a, 3 + round % 7), (&b, 1 + round % 5)] {
                for _ in 0..n {
                    let l = line(i, 40 + i % 61);
                    if ring.push(&l).is_none() {
                        break;
                    }
                    want.push(l);
                    i += 1;
                }
            }
            let n = rings.take_for_sender(&mut take) as usize;
            assert_eq!(n, take.len());
            // How many of a wrapped record's bytes (newline included) were before the end.
            for l in take.lines.iter().filter(|l| l.wrapped) {
                splits.insert(1000 - (l.end - l.len as u64 - 1) % 1000);
            }
            // Deliver a prefix, hand the rest back; the writer's take then has
            // exactly the rest, and a crash would have left exactly that.
            let k = round % (n + 1);
            for j in 0..k {
                got.extend_from_slice(take.line(j));
                got.push(b'\n');
            }
            let mut rest = Vec::new();
            take.rest(k, &mut rest);
            rings.settle(&mut take, k, k < n);
            let left = [recover(a.path()).unwrap(), recover(b.path()).unwrap()].concat();
            let mut writer = Vec::new();
            if k < n {
                rings.give_back();
                assert_eq!(rings.take(&mut writer), (n - k) as u64);
                rings.release();
            }
            assert_eq!(left, rest, "round {round}");
            assert_eq!(writer, rest, "round {round}");
            got.extend_from_slice(&writer);
            assert!(a.drained() && b.drained());
        }
        // Every record once, whole and in order (a take has ring a's, then b's: the
        // order they were pushed in each round).
        assert_eq!(got, want.concat());
        // Records are 40 to 100 bytes: each split a 40-byte record has came up.
        assert!((1..40).all(|k| splits.contains(&k)), "{splits:?}");
    }

    #[test]
    fn the_writer_hands_the_rings_over_only_when_asked_and_syncs_a_late_take() {
        let d = dir("handover");
        let rings = Rings::new(&d, 1, Arc::default());
        let a = rings.add().unwrap();
        assert!(!rings.hand_to_sender());
        rings.ask_for_them();
        assert!(rings.hand_to_sender());
        assert!(rings.sender_takes());
        assert!(!rings.hand_to_sender(), "asked once, handed once");
        a.push(&line(0, 60)).unwrap();
        let mut take = SenderTake::default();
        rings.take_for_sender(&mut take);
        // Held past the interval: synced once (the sync itself is not observable
        // here; that it is marked done for this take is).
        rings.sync_if_late(Duration::ZERO);
        let took = rings.sender_took_at.load(Ordering::Relaxed);
        assert!(took > 0);
        assert_eq!(rings.synced_for.load(Ordering::Relaxed), took);
        let all = take.len();
        rings.settle(&mut take, all, false);
        assert_eq!(rings.sender_took_at.load(Ordering::Relaxed), 0);
        assert!(a.drained());
        // A ring half full of untaken records says so.
        assert!(!rings.half_untaken());
        while a.push(&line(1, 100)).is_some_and(|half| !half) {}
        assert!(rings.half_untaken());
    }

    #[test]
    fn rings_given_back_wake_the_writer() {
        // The writer sleeps long while the sender takes and watches its takes; the
        // rings coming back to it must not wait for the end of that sleep.
        let d = dir("wake");
        let rings = Arc::new(Rings::new(&d, 1, Arc::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            tx.send(()).unwrap();
            let slept = Instant::now();
            std::thread::park_timeout(Duration::from_secs(60));
            slept.elapsed()
        });
        rings.set_writer(writer.thread().clone());
        rx.recv().unwrap();
        rings.ask_for_them();
        assert!(rings.hand_to_sender());
        rings.give_back();
        assert!(!rings.sender_takes());
        assert!(writer.join().unwrap() < Duration::from_secs(30));
    }

    #[test]
    fn a_worker_and_the_writer_on_two_threads_lose_and_repeat_nothing() {
        let d = dir("threads");
        let ring = std::sync::Arc::new(Ring::create(&d.join("stage-x.ring"), 4096).unwrap());
        let n = 50_000;
        let producer = {
            let ring = ring.clone();
            std::thread::spawn(move || {
                for i in 0..n {
                    let l = line(i, 30 + i % 50);
                    while ring.push(&l).is_none() {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut got = Vec::new();
        let mut records = 0;
        while records < n as u64 {
            records += ring.take(&mut got);
            ring.release();
        }
        producer.join().unwrap();
        let want: Vec<u8> = (0..n).flat_map(|i| line(i, 30 + i % 50)).collect();
        assert_eq!(got, want);
    }
}
