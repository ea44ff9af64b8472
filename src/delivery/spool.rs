//! The durable spool: every record is appended to a segment file (group commit: one
//! write per batch the writer thread drains, and an fdatasync for records still
//! undelivered `SYNC_INTERVAL` after their write) before anything tries to deliver it; the sender reads segments back
//! oldest first and advances a cursor as records are delivered or dead-lettered.
//! Delivered segments are deleted.
//!
//! Files in `spool_dir`: `seg-<seq>.jsonl` (JSON Lines, `jq`-readable), `cursor`
//! (`<seq> <offset>` of the oldest record not yet delivered), `dead-letter.jsonl`
//! (permanent refusals), `lock` (flock'd: one proxy per spool dir) and
//! `overflow-<start>-<n>.jsonl`: batches a worker wrote itself because the queue to the
//! writer was full (see `Overflow`); the writer moves them into its segment.
//! `stage-<start>-<n>.ring`: each worker's staging ring (`stage`), mapped shared; a new
//! start turns what a crashed run's rings held into overflow files. `held.jsonl`: the
//! records of a take the sender held unanswered for long (`Held`), likewise.
//!
//! A crash mid-write can only tear the last line of the segment being written; a new
//! start always opens a new segment, so a torn line is the unterminated end of an old
//! one. It is skipped with a warning; nothing else is ever skipped.

use log::{error, info, warn};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Segments rotate past this size, so delivered records can be deleted in pieces.
pub const SEGMENT_BYTES: u64 = 8 << 20;
/// A line longer than this is not a record (records are well under 64 KiB).
const MAX_LINE: u64 = 1 << 20;
/// The reader reads segments this much at a time (hundreds of records a read).
const READ_CHUNK: usize = 256 * 1024;

/// The sender's held-records file (`Held`).
const HELD: &str = "held.jsonl";

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:020}.jsonl"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("seg-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// What the writer has made durable, for the reader.
#[derive(Default, Clone, Copy)]
pub struct Committed {
    /// The segment being written and its durable length.
    pub seq: u64,
    pub len: u64,
    /// The writer has stopped: nothing more will come.
    pub closed: bool,
}

/// State shared by the writer and the sender threads.
#[derive(Default)]
pub struct SpoolState {
    pub committed: Mutex<Committed>,
    pub grown: Condvar,
    /// Bytes spooled and not yet delivered (or dead-lettered).
    pub backlog_bytes: AtomicU64,
    /// The workers stage records in rings (`stage`): the writer already gathers them
    /// for a whole ring turn, so the sender need not wait for more after a commit.
    pub staged: AtomicBool,
}

/// An opened, locked spool directory.
pub struct Spool {
    pub dir: PathBuf,
    _lock: File,
    pub shared: Arc<SpoolState>,
    first_new_seq: u64,
}

impl Spool {
    pub fn open(dir: &Path) -> Result<Spool, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("usage_hook.spool_dir: cannot create {}: {e}", dir.display()))?;
        let lock = lock_file(&dir.join("lock"))
            .map_err(|e| format!("usage_hook.spool_dir: {}: {e}", dir.display()))?;
        let segs = list_segments(dir)
            .map_err(|e| format!("usage_hook.spool_dir: cannot list {}: {e}", dir.display()))?;
        // Overflow files a crash left before their rename hold complete batches but for
        // a possibly torn last line, which the writer skips as it takes them in.
        for name in list_overflow(dir, ".jsonl.tmp") {
            let from = dir.join(&name);
            let _ = std::fs::rename(&from, from.with_extension(""));
        }
        let first_new_seq = segs.last().map_or(1, |s| s + 1);
        // Staging rings a crash (or a stop with the disk refusing writes) left: what
        // their writer never released becomes an overflow file, which the writer takes
        // in first. One that cannot be read is set aside under a new name, not lost.
        for (i, path) in super::stage::list(dir).into_iter().enumerate() {
            match super::stage::recover(&path) {
                Ok(lines) => {
                    let to = dir.join(format!("overflow-{first_new_seq:020}-ring-{i:04}.jsonl"));
                    let tmp = to.with_extension("jsonl.tmp");
                    let kept = lines.is_empty()
                        || std::fs::write(&tmp, &lines)
                            .and_then(|()| File::open(&tmp)?.sync_all())
                            .and_then(|()| std::fs::rename(&tmp, &to))
                            .is_ok();
                    if kept {
                        if !lines.is_empty() {
                            info!(
                                "usage spool: {} held {} records not yet in a segment; taken in",
                                path.display(),
                                memchr::memchr_iter(b'\n', &lines).count()
                            );
                        }
                        let _ = std::fs::remove_file(&path);
                    } else {
                        return Err(format!(
                            "usage_hook.spool_dir: cannot move the records of {} to an overflow file",
                            path.display()
                        ));
                    }
                }
                Err(e) => {
                    let aside = path.with_extension("ring.unreadable");
                    error!(
                        "usage spool: {} cannot be read as a staging ring ({e}); moved to {}",
                        path.display(),
                        aside.display()
                    );
                    let _ = std::fs::rename(&path, &aside);
                }
            }
        }
        // Records a sender held unanswered for long when the last run stopped: taken
        // in like an overflow file (at worst a second time: also from the rings).
        let held = dir.join(HELD);
        if std::fs::metadata(&held).is_ok_and(|m| m.len() > 0) {
            let to = dir.join(format!("overflow-{first_new_seq:020}-held.jsonl"));
            std::fs::rename(&held, &to).map_err(|e| {
                format!(
                    "usage_hook.spool_dir: cannot move {} to an overflow file: {e}",
                    held.display()
                )
            })?;
            sync_dir(dir);
            info!(
                "usage spool: {} held records from the last run; taken in",
                held.display()
            );
        }
        // Backlog from before this start: everything from the cursor on.
        let (cseq, coff) = read_cursor(dir);
        let mut backlog = 0;
        for s in &segs {
            if *s >= cseq {
                let len = std::fs::metadata(segment_path(dir, *s)).map_or(0, |m| m.len());
                backlog += if *s == cseq {
                    len.saturating_sub(coff)
                } else {
                    len
                };
            }
        }
        let shared = Arc::new(SpoolState::default());
        shared.backlog_bytes.store(backlog, Relaxed);
        Ok(Spool {
            dir: dir.to_path_buf(),
            _lock: lock,
            shared,
            first_new_seq,
        })
    }

    /// What workers use to spool a batch themselves when the queue is full.
    pub fn overflow(&self) -> Arc<Overflow> {
        Arc::new(Overflow {
            dir: self.dir.clone(),
            start: self.first_new_seq,
            next: AtomicU64::new(0),
            written: AtomicBool::new(false),
        })
    }

    /// The workers' staging rings of this start.
    pub fn rings(&self) -> Arc<super::stage::Rings> {
        Arc::new(super::stage::Rings::new(
            &self.dir,
            self.first_new_seq,
            self.shared.clone(),
        ))
    }

    pub fn writer(&self) -> io::Result<SpoolWriter> {
        SpoolWriter::create(&self.dir, self.first_new_seq, self.shared.clone())
    }

    pub fn reader(&self) -> SpoolReader {
        let (seq, offset) = read_cursor(&self.dir);
        let cursor = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.dir.join("cursor"))
            .ok();
        SpoolReader {
            dir: self.dir.clone(),
            seq,
            offset,
            read_pos: offset,
            pending: Default::default(),
            file: None,
            chunk: Vec::new(),
            chunk_at: 0,
            chunk_end: 0,
            file_pos: 0,
            known: Committed::default(),
            sealed_len: None,
            cursor,
            spare: Vec::new(),
            cursor_dirty: false,
            shared: self.shared.clone(),
        }
    }
}

/// An exclusive lock on `path` (flock, without waiting), with the holder's pid written
/// in it.
pub fn lock_file(path: &Path) -> Result<File, String> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // An exclusive flock(2), held as long as the file is open (std's `try_lock`).
    if f.try_lock().is_err() {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        return Err(format!(
            "in use by another llmproxy (pid {}); two proxies must not share a spool dir",
            holder.trim()
        ));
    }
    let _ = f.set_len(0);
    let _ = f.write_all(std::process::id().to_string().as_bytes());
    Ok(f)
}

/// Overflow file names in `dir` ending in `suffix`, oldest first.
fn list_overflow(dir: &Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("overflow-") && n.ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    // Fixed-width numbers: the name order is the order they were written in.
    names.sort_unstable();
    names
}

/// A worker whose batch finds the queue to the writer full writes the batch to a file
/// of its own in the spool dir instead of dropping it: a write to the page cache,
/// rare (the writer fell `queue_size` records behind), and no lock shared with the
/// writer. The file appears under its final name only once complete (rename), and the
/// writer moves it into its segment at its next turn (then it is read and delivered
/// like any other record). Memory stays bounded whatever the burst: a worker holds
/// one batch at most.
pub struct Overflow {
    dir: PathBuf,
    /// This start's first segment number: names never collide with files a crashed
    /// run left behind.
    start: u64,
    next: AtomicU64,
    /// Set after a file was written; the writer clears it when it looks.
    written: AtomicBool,
}

impl Overflow {
    /// Writes `lines` (whole spool lines) to a new overflow file.
    pub fn write(&self, lines: &[u8]) -> io::Result<()> {
        let n = self.next.fetch_add(1, Relaxed);
        let path = self
            .dir
            .join(format!("overflow-{:020}-{n:020}.jsonl.tmp", self.start));
        let result = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(lines))
            .and_then(|()| std::fs::rename(&path, path.with_extension("")));
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        self.written
            .store(true, std::sync::atomic::Ordering::Release);
        result
    }

    /// Whether files were written since the last call.
    pub fn take_written(&self) -> bool {
        self.written
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

fn read_cursor(dir: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(dir.join("cursor")).unwrap_or_default();
    let mut it = text.split_whitespace().map(|s| s.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(s), Some(o)) => (s, o),
        _ => (0, 0),
    }
}

pub struct SpoolWriter {
    dir: PathBuf,
    seq: u64,
    file: File,
    len: u64,
    buf: Vec<u8>,
    /// Bytes were written since the last fdatasync.
    unsynced: bool,
    shared: Arc<SpoolState>,
}

impl SpoolWriter {
    fn create(dir: &Path, seq: u64, shared: Arc<SpoolState>) -> io::Result<SpoolWriter> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(segment_path(dir, seq))?;
        sync_dir(dir);
        if let Ok(mut c) = shared.committed.lock() {
            c.seq = seq;
            c.len = 0;
        }
        Ok(SpoolWriter {
            dir: dir.to_path_buf(),
            seq,
            file,
            len: 0,
            buf: Vec::with_capacity(64 * 1024),
            unsynced: false,
            shared,
        })
    }

    /// Buffers one record (a JSON object without newline).
    pub fn append(&mut self, record: &[u8]) {
        self.append_with(|buf| buf.extend_from_slice(record));
    }

    /// Buffers one record that `write` appends (as one line, without the newline)
    /// straight into the commit buffer.
    pub fn append_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.buf);
        self.buf.push(b'\n');
    }

    /// Buffers the whole lines `take` appends to the commit buffer; returns its count.
    pub fn append_from(&mut self, take: impl FnOnce(&mut Vec<u8>) -> u64) -> u64 {
        take(&mut self.buf)
    }

    /// Forgets what is buffered and not written (kept elsewhere: the rings).
    pub fn discard_pending(&mut self) {
        self.buf.clear();
    }

    /// Buffers whole lines (records, each ending in a newline).
    pub fn append_lines(&mut self, lines: &[u8]) {
        self.buf.extend_from_slice(lines);
    }

    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Wakes the reader (`SpoolReader::wait`) without a commit.
    pub fn wake_reader(&self) {
        self.shared.grown.notify_all();
    }

    /// Spooled bytes not yet delivered (or dead-lettered).
    pub fn backlog(&self) -> u64 {
        self.shared.backlog_bytes.load(Relaxed)
    }

    /// Everything written is fdatasync'd.
    pub fn synced(&self) -> bool {
        !self.unsynced
    }

    /// Writes and fsyncs what is buffered, then tells the reader.
    pub fn commit(&mut self) -> io::Result<()> {
        self.write_out(true)
    }

    /// Writes what is buffered to the segment and tells the reader. Once written, a
    /// record is in the page cache: it survives the proxy crashing (`kill -9`). With
    /// `sync` it is also fdatasync'd (it survives power loss); a segment is always
    /// synced before the next one starts.
    pub fn write_out(&mut self, sync: bool) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
            self.unsynced = true;
            self.len += self.buf.len() as u64;
            self.shared
                .backlog_bytes
                .fetch_add(self.buf.len() as u64, Relaxed);
            self.buf.clear();
            if let Ok(mut c) = self.shared.committed.lock() {
                c.seq = self.seq;
                c.len = self.len;
            }
            self.shared.grown.notify_all();
        }
        if sync || self.len >= SEGMENT_BYTES {
            self.sync()?;
        }
        if self.len >= SEGMENT_BYTES {
            let next = SpoolWriter::create(&self.dir, self.seq + 1, self.shared.clone())?;
            *self = SpoolWriter {
                buf: std::mem::take(&mut self.buf),
                ..next
            };
            self.shared.grown.notify_all();
        }
        Ok(())
    }

    /// Moves every overflow file into the segment: appended, written out and synced,
    /// then the file is deleted (a crash in between delivers its records twice, which
    /// the Idempotency-Key lets the receiver drop). A torn last line (a crash while a
    /// worker wrote it) is skipped with a warning. Returns the records taken in.
    pub fn take_overflow(&mut self) -> io::Result<u64> {
        let mut records = 0;
        for name in list_overflow(&self.dir, ".jsonl") {
            let path = self.dir.join(&name);
            let mut data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let whole = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if whole < data.len() {
                warn!(
                    "usage spool: skipping a torn last line ({} bytes) in {}",
                    data.len() - whole,
                    path.display()
                );
                data.truncate(whole);
            }
            let before = self.buf.len();
            self.append_lines(&data);
            if let Err(e) = self.write_out(true) {
                // The file stays and is taken at a later turn.
                self.buf.truncate(before);
                return Err(e);
            }
            records += memchr::memchr_iter(b'\n', &data).count() as u64;
            std::fs::remove_file(&path)?;
        }
        Ok(records)
    }

    /// Makes every later write fail (EBADF), as a disk that refuses would.
    #[cfg(test)]
    pub fn fail_writes(&mut self) -> io::Result<()> {
        self.file = File::open(segment_path(&self.dir, self.seq))?;
        Ok(())
    }

    /// fdatasyncs what was written and not yet synced.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Commits what is buffered and tells the reader no more comes. Returns how many
    /// records could not be written: each is logged in full, never lost silently.
    pub fn close(mut self) -> u64 {
        let mut lost = 0;
        if let Err(e) = self.commit() {
            error!("usage spool: final commit failed: {e}");
            lost = log_undelivered(&self.buf, "usage spool");
        }
        if let Ok(mut c) = self.shared.committed.lock() {
            c.closed = true;
        }
        self.shared.grown.notify_all();
        lost
    }
}

/// Logs each record of `lines` (spool lines) in full as UNDELIVERED RECORD; returns
/// how many there were.
pub fn log_undelivered(lines: &[u8], why: &str) -> u64 {
    let mut n = 0;
    for line in lines.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        error!(
            "{why}: UNDELIVERED RECORD: {}",
            String::from_utf8_lossy(line)
        );
        n += 1;
    }
    n
}

/// Opens a segment to read it back without updating its access time: under `relatime`
/// every read of a segment still being appended to wrote the inode (~1 % of the
/// billing threads at moderate rates). Falls back to a plain open where `O_NOATIME`
/// is refused (a spool directory owned by another user).
fn open_for_reading(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
        .or_else(|e| match e.raw_os_error() {
            Some(libc::EPERM) => File::open(path),
            _ => Err(e),
        })
}

/// The cursor file's one line: `<seq> <offset>`, each zero-padded to 20 digits (fixed
/// width, so an overwrite in place never leaves stale digits).
fn cursor_line(seq: u64, offset: u64) -> [u8; 42] {
    let mut line = [b'0'; 42];
    for (at, mut v) in [(0, seq), (21, offset)] {
        for i in (at..at + 20).rev() {
            line[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    line[20] = b' ';
    line[41] = b'\n';
    line
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

pub enum Next {
    Record(Vec<u8>),
    /// Nothing spooled yet beyond the cursor.
    Empty,
    /// The writer closed and everything was read.
    Closed,
}

pub struct SpoolReader {
    dir: PathBuf,
    seq: u64,
    /// Where the oldest record not yet acknowledged starts (what the cursor saves).
    offset: u64,
    /// Where the next record to hand out starts.
    read_pos: u64,
    /// Lengths of the records handed out and not yet acknowledged, oldest first.
    pending: std::collections::VecDeque<u64>,
    /// Segment `seq`, open while records are read from it.
    file: Option<File>,
    /// Bytes read from `file` and not yet handed out are `chunk[chunk_at..chunk_end]`;
    /// the next read starts at `file_pos`. One read covers many records, and lines are
    /// found with the SIMD memchr. `chunk` is zeroed once, when it is allocated.
    chunk: Vec<u8>,
    chunk_at: usize,
    chunk_end: usize,
    file_pos: u64,
    /// The writer's `Committed` as last seen: the lock is taken again only once the
    /// records it covered are read.
    known: Committed,
    /// The final length of segment `seq` once the writer has moved past it (sealed
    /// segments do not grow: one stat per segment, not one per record).
    sealed_len: Option<(u64, u64)>,
    cursor: Option<File>,
    /// Line buffers handed back by `recycle`, reused by the next lines read.
    spare: Vec<Vec<u8>>,
    /// The cursor file is behind `offset` (saved by `save`, once per batch).
    cursor_dirty: bool,
    shared: Arc<SpoolState>,
}

impl SpoolReader {
    pub fn shared(&self) -> Arc<SpoolState> {
        self.shared.clone()
    }

    /// The next record after those handed out, waiting up to `wait` for one. Records
    /// are handed out in order and acknowledged in order; a batch never crosses the end
    /// of a segment (`Empty` until its records are acknowledged).
    pub fn next(&mut self, wait: Duration) -> Next {
        loop {
            if !self.behind(&self.known) {
                self.known = match self.shared.committed.lock() {
                    Ok(c) => *c,
                    Err(_) => return Next::Closed,
                };
            }
            let Committed {
                seq: cseq,
                len: clen,
                closed,
            } = self.known;
            if self.behind(&self.known) {
                let limit = if self.seq == cseq {
                    clen
                } else {
                    self.sealed_len()
                };
                if self.read_pos < limit {
                    match self.read_line(limit) {
                        Ok(Some(line)) => return Next::Record(line),
                        Ok(None) if self.pending.is_empty() => continue, // a torn line was skipped
                        Ok(None) => return Next::Empty, // acknowledge what is out first
                        Err(e) => {
                            error!("usage spool: cannot read segment {}: {e}", self.seq);
                            std::thread::sleep(wait);
                            return Next::Empty;
                        }
                    }
                }
                if !self.pending.is_empty() {
                    return Next::Empty;
                }
                if self.seq < cseq {
                    self.finish_segment();
                    continue;
                }
            }
            if !self.pending.is_empty() {
                return Next::Empty;
            }
            if closed {
                return Next::Closed;
            }
            // Not even a zero-timeout wait: it was a futex call each sender turn.
            if wait.is_zero() {
                return Next::Empty;
            }
            let Ok(guard) = self.shared.committed.lock() else {
                return Next::Closed;
            };
            let (_guard, timeout) = match self.shared.grown.wait_timeout(guard, wait) {
                Ok(r) => r,
                Err(_) => return Next::Closed,
            };
            if timeout.timed_out() {
                return Next::Empty;
            }
        }
    }

    /// Waits up to `d` for the writer to commit records or wake this reader
    /// (`SpoolWriter::wake_reader`); returns at the first of either.
    pub fn wait(&self, d: Duration) {
        let Ok(c) = self.shared.committed.lock() else {
            return;
        };
        if !self.behind(&c) {
            let _ = self.shared.grown.wait_timeout(c, d);
        }
    }

    /// Whether `c` holds committed records this reader has not handed out yet.
    fn behind(&self, c: &Committed) -> bool {
        self.seq < c.seq || (self.seq == c.seq && self.read_pos < c.len)
    }

    fn read_line(&mut self, limit: u64) -> io::Result<Option<Vec<u8>>> {
        if self.file.is_none() {
            match open_for_reading(&segment_path(&self.dir, self.seq)) {
                Ok(f) => {
                    self.file = Some(f);
                    self.chunk_at = 0;
                    self.chunk_end = 0;
                    self.file_pos = self.read_pos;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if self.pending.is_empty() {
                        self.offset = limit;
                        self.read_pos = limit;
                    }
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        // The line ends at the first newline after `chunk_at`; read more (at most up to
        // `limit`, what the writer has committed) until there is one.
        let end = loop {
            let have = &self.chunk[self.chunk_at..self.chunk_end];
            if let Some(i) = memchr::memchr(b'\n', have) {
                break Some(self.chunk_at + i);
            }
            if self.file_pos >= limit || have.len() as u64 >= MAX_LINE {
                break None;
            }
            // Keep the partial line, at the front, and read after it.
            self.chunk.copy_within(self.chunk_at..self.chunk_end, 0);
            self.chunk_end -= self.chunk_at;
            self.chunk_at = 0;
            let want = (limit - self.file_pos).min(READ_CHUNK as u64) as usize;
            if self.chunk.len() < self.chunk_end + want {
                self.chunk.resize(self.chunk_end + want, 0);
            }
            let Some(file) = self.file.as_ref() else {
                return Ok(None);
            };
            let into = &mut self.chunk[self.chunk_end..self.chunk_end + want];
            let n = file.read_at(into, self.file_pos)?;
            self.chunk_end += n;
            self.file_pos += n as u64;
            if n == 0 {
                break None;
            }
        };
        let from = self.chunk_at;
        let to = end.unwrap_or(self.chunk_end.min(from + MAX_LINE as usize));
        let mut line = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(1024));
        line.clear();
        line.extend_from_slice(&self.chunk[from..to]);
        if end.is_some() {
            self.chunk_at = to + 1;
            self.pending.push_back(line.len() as u64 + 1);
            self.read_pos += line.len() as u64 + 1;
            return Ok(Some(line));
        }
        if !self.pending.is_empty() {
            // Dealt with once the records before it are acknowledged.
            self.close_file();
            return Ok(None);
        }
        // No newline before the committed end: the torn tail of a crashed write.
        warn!(
            "usage spool: skipping a torn last line ({} bytes) in {}",
            line.len(),
            segment_path(&self.dir, self.seq).display()
        );
        self.shared
            .backlog_bytes
            .fetch_sub(line.len() as u64, Relaxed);
        self.offset += line.len() as u64;
        self.read_pos = self.offset;
        self.close_file();
        self.save_cursor();
        Ok(None)
    }

    fn close_file(&mut self) {
        self.file = None;
        self.chunk_at = 0;
        self.chunk_end = 0;
    }

    fn sealed_len(&mut self) -> u64 {
        match self.sealed_len {
            Some((seq, len)) if seq == self.seq => len,
            _ => {
                let len =
                    std::fs::metadata(segment_path(&self.dir, self.seq)).map_or(0, |m| m.len());
                self.sealed_len = Some((self.seq, len));
                len
            }
        }
    }

    /// Takes back the line buffers in `lines` (leaving it empty) for the next reads.
    pub fn recycle(&mut self, lines: &mut Vec<Vec<u8>>) {
        self.spare.append(lines);
    }

    /// Forgets the records handed out but not acknowledged: they come again.
    pub fn rewind(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.pending.clear();
        self.read_pos = self.offset;
        self.close_file();
    }

    /// The oldest record handed out was delivered or dead-lettered: move past it. The
    /// cursor file follows at the next `save` (a crash in between delivers those
    /// records again, which the Idempotency-Key lets the receiver drop).
    pub fn ack(&mut self) {
        let Some(len) = self.pending.pop_front() else {
            return;
        };
        self.offset += len;
        self.shared
            .backlog_bytes
            .fetch_sub(len.min(self.shared.backlog_bytes.load(Relaxed)), Relaxed);
        self.cursor_dirty = true;
    }

    /// Writes the cursor if records were acknowledged since the last save: one write
    /// per delivered batch rather than one per record.
    pub fn save(&mut self) {
        if self.cursor_dirty {
            self.save_cursor();
        }
    }

    fn save_cursor(&mut self) {
        self.cursor_dirty = false;
        if let Some(c) = &self.cursor
            && let Err(e) = c.write_all_at(&cursor_line(self.seq, self.offset), 0)
        {
            error!("usage spool: cannot save the cursor: {e}");
        }
    }

    fn finish_segment(&mut self) {
        let path = segment_path(&self.dir, self.seq);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(
                "usage spool: cannot delete delivered segment {}: {e}",
                path.display()
            );
        }
        let next = list_segments(&self.dir)
            .ok()
            .and_then(|s| s.into_iter().find(|&s| s > self.seq));
        let cseq = self.shared.committed.lock().map_or(self.seq + 1, |c| c.seq);
        self.seq = next.unwrap_or(cseq).min(cseq);
        self.offset = 0;
        self.read_pos = 0;
        self.close_file();
        self.save_cursor();
    }
}

/// `held.jsonl`: the unsettled records of a take the sender has held unanswered for
/// `SECURE_AFTER` (a slow webhook), fdatasync'd, so that a power loss cannot lose
/// them; emptied when the take is settled. A new start takes in what it holds (its
/// records may also be in the rings it recovers: then they are delivered twice, with
/// the same Idempotency-Key).
pub struct Held {
    file: File,
}

impl Held {
    pub fn open(dir: &Path) -> io::Result<Held> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(HELD))?;
        sync_dir(dir);
        Ok(Held { file })
    }

    /// Writes `lines` (whole records) in place of what the file held, durably.
    pub fn hold(&mut self, lines: &[u8]) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.write_all_at(lines, 0)?;
        self.file.sync_data()
    }

    /// The take is settled: nothing is held (no sync: a power loss before the
    /// truncation reaches the disk delivers those records again).
    pub fn clear(&mut self) {
        if let Err(e) = self.file.set_len(0) {
            warn!("usage spool: cannot empty {HELD}: {e}");
        }
    }
}

/// An exclusive flock(2) on `f`, waiting until the holder is done (std's `lock`).
fn flock(f: &File) -> io::Result<()> {
    f.lock()
}

/// Appends a refused record to `dead-letter.jsonl`, durably. The file is flock'd so
/// `llmproxy spool replay-dead` can rewrite it while the proxy runs.
pub fn dead_letter(dir: &Path, record: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dead-letter.jsonl"))?;
    flock(&f)?;
    let mut line = Vec::with_capacity(record.len() + 1);
    line.extend_from_slice(record);
    line.push(b'\n');
    f.write_all(&line)?;
    f.sync_data()
}

/// Locks the dead-letter file and reads its records; hand the file back to
/// `put_back_dead_letters`, which keeps the lock until the rewrite is done.
pub fn take_dead_letters(path: &Path) -> io::Result<(Vec<Vec<u8>>, File)> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    flock(&f)?;
    let mut text = Vec::new();
    f.read_to_end(&mut text)?;
    let lines = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(<[u8]>::to_vec)
        .collect();
    Ok((lines, f))
}

pub fn put_back_dead_letters(f: File, kept: &[Vec<u8>]) -> io::Result<()> {
    let mut out = Vec::new();
    for l in kept {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    f.set_len(0)?;
    f.write_all_at(&out, 0)?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        crate::testing::clean_at_exit();
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "llmproxy-spool-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn drain(r: &mut SpoolReader) -> Vec<String> {
        let mut out = Vec::new();
        while let Next::Record(l) = r.next(Duration::from_millis(10)) {
            out.push(String::from_utf8(l).unwrap());
            r.ack();
        }
        r.save();
        out
    }

    #[test]
    fn held_records_are_taken_in_by_the_next_start_and_an_emptied_file_is_not() {
        let d = dir();
        {
            let spool = Spool::open(&d).unwrap();
            let mut held = Held::open(&d).unwrap();
            held.hold(b"{\"request_id\":\"a\"}\n{\"request_id\":\"b\"}\n")
                .unwrap();
            // A later hold replaces the earlier (what is left of the same take).
            held.hold(b"{\"request_id\":\"b\"}\n").unwrap();
            drop(spool);
        }
        let spool = Spool::open(&d).unwrap();
        let mut writer = spool.writer().unwrap();
        assert_eq!(writer.take_overflow().unwrap(), 1);
        assert_eq!(drain(&mut spool.reader()), [r#"{"request_id":"b"}"#]);
        // Settled and emptied: the next start takes nothing in.
        let mut held = Held::open(&d).unwrap();
        held.hold(b"{\"request_id\":\"c\"}\n").unwrap();
        held.clear();
        drop((writer, spool));
        let spool = Spool::open(&d).unwrap();
        assert_eq!(spool.writer().unwrap().take_overflow().unwrap(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn records_come_back_in_order_and_cursor_survives_restart() {
        let d = dir();
        {
            let spool = Spool::open(&d).unwrap();
            let mut w = spool.writer().unwrap();
            let mut r = spool.reader();
            for i in 0..5 {
                w.append(format!("{{\"n\":{i}}}").as_bytes());
            }
            w.commit().unwrap();
            let Next::Record(first) = r.next(Duration::from_millis(10)) else {
                panic!()
            };
            assert_eq!(first, b"{\"n\":0}");
            r.ack();
            r.save();
            let Next::Record(again) = r.next(Duration::from_millis(10)) else {
                panic!()
            };
            assert_eq!(again, b"{\"n\":1}");
            // Not acknowledged: a restart hands it out again.
            assert!(Spool::open(&d).is_err(), "the spool dir must be locked");
        }
        let spool = Spool::open(&d).unwrap();
        let _w = spool.writer().unwrap();
        let mut r = spool.reader();
        assert_eq!(
            drain(&mut r),
            vec!["{\"n\":1}", "{\"n\":2}", "{\"n\":3}", "{\"n\":4}"]
        );
        assert_eq!(spool.shared.backlog_bytes.load(Relaxed), 0);
    }

    #[test]
    fn records_across_read_chunks_and_commits_come_back_whole_and_in_order() {
        // Lines of many lengths, committed in uneven batches while the reader reads, so
        // lines straddle the reader's chunks and the committed end in every way.
        let d = dir();
        let spool = Spool::open(&d).unwrap();
        let mut w = spool.writer().unwrap();
        let mut r = spool.reader();
        let line = |i: usize| format!("{i}:{}", "x".repeat(i * 7919 % 1500));
        let mut got = Vec::new();
        let total = 2500;
        for i in 0..total {
            w.append(line(i).as_bytes());
            if i % 97 == 0 || i % 13 == 5 {
                w.write_out(false).unwrap();
                while let Next::Record(l) = r.next(Duration::ZERO) {
                    got.push(String::from_utf8(l).unwrap());
                    r.ack();
                }
            }
        }
        w.commit().unwrap();
        got.extend(drain(&mut r));
        assert!(total * 750 > 2 * READ_CHUNK, "spans several reads");
        assert_eq!(got.len(), total);
        for (i, l) in got.iter().enumerate() {
            assert_eq!(l, &line(i));
        }
        assert_eq!(spool.shared.backlog_bytes.load(Relaxed), 0);
    }

    #[test]
    fn acknowledged_but_unsaved_records_come_again_after_a_crash() {
        let d = dir();
        {
            let spool = Spool::open(&d).unwrap();
            let mut w = spool.writer().unwrap();
            let mut r = spool.reader();
            for i in 0..3 {
                w.append(format!("{i}").as_bytes());
            }
            w.commit().unwrap();
            assert!(matches!(r.next(Duration::ZERO), Next::Record(_)));
            r.ack();
            r.save();
            assert!(matches!(r.next(Duration::ZERO), Next::Record(_)));
            r.ack(); // delivered, then the process dies before the batch's save
        }
        let spool = Spool::open(&d).unwrap();
        let _w = spool.writer().unwrap();
        // At least once: the unsaved acknowledgement is delivered again, nothing lost.
        assert_eq!(drain(&mut spool.reader()), vec!["1", "2"]);
    }

    #[test]
    fn batches_ack_in_order_and_rewind() {
        let d = dir();
        let spool = Spool::open(&d).unwrap();
        let mut w = spool.writer().unwrap();
        for i in 0..4 {
            w.append(format!("{i}").as_bytes());
        }
        w.commit().unwrap();
        let mut r = spool.reader();
        let mut got = Vec::new();
        while let Next::Record(l) = r.next(Duration::ZERO) {
            got.push(l);
        }
        assert_eq!(got.len(), 4);
        r.ack();
        r.ack();
        r.rewind();
        assert_eq!(drain(&mut r), vec!["2", "3"]);
    }

    #[test]
    fn torn_last_line_is_skipped_and_rest_delivered() {
        let d = dir();
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(segment_path(&d, 3), b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        std::fs::write(segment_path(&d, 4), b"{\"d\":4}\n").unwrap();
        let spool = Spool::open(&d).unwrap();
        let mut w = spool.writer().unwrap();
        w.append(b"{\"e\":5}");
        w.commit().unwrap();
        let mut r = spool.reader();
        assert_eq!(
            drain(&mut r),
            vec!["{\"a\":1}", "{\"b\":2}", "{\"d\":4}", "{\"e\":5}"]
        );
        // Delivered segments are gone; the one being written stays.
        assert_eq!(list_segments(&d).unwrap(), vec![5]);
    }

    #[test]
    fn cursor_lines_read_back() {
        for (seq, offset) in [(0, 0), (7, 8_388_608), (u64::MAX, 12)] {
            let line = cursor_line(seq, offset);
            assert_eq!(
                std::str::from_utf8(&line).unwrap(),
                format!("{seq:020} {offset:020}\n")
            );
            let d = dir();
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cursor"), line).unwrap();
            assert_eq!(read_cursor(&d), (seq, offset));
        }
    }

    #[test]
    fn rotates_segments() {
        let d = dir();
        let spool = Spool::open(&d).unwrap();
        let mut w = spool.writer().unwrap();
        let big = vec![b'x'; 1 << 20];
        let rec = [b"\"".as_slice(), &big, b"\""].concat();
        for _ in 0..10 {
            w.append(&rec);
            w.commit().unwrap();
        }
        assert!(list_segments(&d).unwrap().len() >= 2);
        let mut r = spool.reader();
        assert_eq!(drain(&mut r).len(), 10);
        w.close();
        assert!(matches!(r.next(Duration::from_millis(10)), Next::Closed));
    }
}
