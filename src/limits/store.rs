//! Limits beyond one process, off the request path: the sync thread.
//!
//! **With `limits_store: redis://…`** every `limits_sync_interval` (100 ms) the thread
//! writes this proxy's own count of each limit in use into Redis and reads back the
//! sum over all proxies, in one Lua script call per 256 counts. A count lives in a hash
//! per (key, limit, window), e.g. `llmproxy:limits:<key id>:rpm:<minute>`, with one
//! field per proxy process (`host:pid:start`) holding that process's **absolute**
//! count in the window. Writing absolute counts instead of increments makes a sync
//! idempotent: a retried or repeated sync counts nothing twice, and a Redis that lost
//! its data (restarted without persistence) gets every live proxy's current counts
//! back at the next sync. A restarted proxy starts a new field; the old process's field
//! stays, so a budget keeps what was spent before the restart. Hashes expire with their
//! window (2 minutes for rpm/tpm, 2 days for a daily budget, 62 days for a monthly one;
//! a `total` budget never expires).
//!
//! Workers never talk to Redis: they count in their key's atomics (`Tally::local`) and
//! read the other proxies' sum as of the last sync (`Tally::others`). So each proxy may
//! admit, per key, what arrives within one sync interval beyond a limit (plus, for
//! tokens, what the requests in flight use). The keys synced each time are those used
//! in this or the last minute, or with counts not yet written; every key with a budget
//! is read at start and after a reload, so a restart begins with the budgets spent.
//!
//! Redis down or slow: the proxy serves on its own counts plus the last view of the
//! others (fail open), logs once, sets `llmproxy_limits_store_up 0`, and tries again
//! every interval; the first sync that succeeds writes its counts and resyncs. With
//! `limits_fail_closed: true`, limited keys' requests get a 503 while the store is
//! unreachable.
//!
//! **Without a store**, budgets are written to a small JSON state file (at most once a
//! second when they changed, and at shutdown; write, fsync, rename) and read back at
//! start, so a restart resets no budget. A crash (`kill -9`) can lose the last second's
//! charges to a budget; a clean stop loses none.

use crate::auth::{Auth, Key};
use crate::config::{BudgetPeriod, Config};
use crate::limits::{Clock, Tally};
use crate::metrics::Metrics;
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

/// The current key table (replaced by a reload).
pub type AuthSource = Box<dyn Fn() -> Arc<Auth> + Send>;

/// Counts per script call: a few hundred keep each call well under a millisecond of
/// Redis time, so other clients are not held up.
const BATCH: usize = 256;

/// For each KEYS[i]: sets this proxy's field (ARGV[1]) to its count ARGV[2i] unless it
/// is `-` (unchanged since the last sync, or 0), sets the hash's expiry to ARGV[2i+1]
/// (seconds; 0: none) when that field is new, and returns the sum over all fields. Counts are passed and stored as the strings the proxy wrote
/// (Lua 5.1 would print large numbers in exponent form); sums stay below 2^53.
const SYNC_SCRIPT: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  local mine = ARGV[2 * i]
  if mine ~= '-' then
    local ttl = tonumber(ARGV[2 * i + 1])
    if redis.call('HSET', k, ARGV[1], mine) == 1 and ttl > 0 then
      redis.call('EXPIRE', k, ttl)
    end
  end
  local sum = 0
  for _, v in ipairs(redis.call('HVALS', k)) do
    sum = sum + tonumber(v)
  end
  out[i] = sum
end
return out
";

/// A key's id in the store and the state file: the first 16 bytes of its SHA-256, in
/// hex (never the key).
fn key_id(digest: &[u8; 32]) -> String {
    use std::fmt::Write;
    digest[..16]
        .iter()
        .fold(String::with_capacity(32), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// One count to sync: which tally, in which window, under which name.
struct Entry<'a> {
    tally: &'a Tally,
    window: u64,
    local: u64,
    name: String,
    ttl_secs: u64,
}

/// The counts of `key` to sync at `clock`: rpm, tpm and budget, as configured.
fn entries<'a>(id: &str, key: &'a Key, clock: &Clock, out: &mut Vec<Entry<'a>>) {
    let l = &key.limits;
    let c = &key.counters;
    let mut push = |tally: &'a Tally, window: u64, name: String, ttl_secs: u64| {
        out.push(Entry {
            tally,
            window,
            local: tally.local.get(window),
            name,
            ttl_secs,
        })
    };
    if l.rpm.is_some() {
        let m = clock.minute;
        push(&c.requests, m, format!("llmproxy:limits:{id}:rpm:{m}"), 120);
    }
    if l.tpm.is_some() {
        let m = clock.minute;
        push(&c.tokens, m, format!("llmproxy:limits:{id}:tpm:{m}"), 120);
    }
    if let Some(b) = l.budget {
        let (w, _) = clock.budget_window(b.period);
        let (name, ttl) = match b.period {
            BudgetPeriod::Day => (format!("llmproxy:limits:{id}:budget:day:{w}"), 2 * 86_400),
            BudgetPeriod::Month => (
                format!("llmproxy:limits:{id}:budget:month:{w}"),
                62 * 86_400,
            ),
            BudgetPeriod::Total => (format!("llmproxy:limits:{id}:budget:total"), 0),
        };
        push(&c.budget, w, name, ttl);
    }
}

/// The Redis side: one connection, opened again after any failure.
struct Redis {
    client: redis::Client,
    url: String,
    con: Option<redis::Connection>,
    script: redis::Script,
    /// This process's field in every hash.
    field: String,
}

impl Redis {
    /// Writes this proxy's counts of `batch` and reads back the sums: the other
    /// proxies' share goes into each tally's `others`. A slow store is given at least
    /// a second (the thread's next sync simply waits).
    fn sync(&mut self, batch: &[Entry<'_>], interval: Duration) -> redis::RedisResult<()> {
        let timeout = interval.max(Duration::from_secs(1));
        let con = match &mut self.con {
            Some(c) => c,
            None => {
                let con = self.client.get_connection_with_timeout(timeout)?;
                con.set_read_timeout(Some(timeout))?;
                con.set_write_timeout(Some(timeout))?;
                self.con.insert(con)
            }
        };
        let result: redis::RedisResult<Vec<u64>> = if batch.is_empty() {
            // Nothing in use: still find out whether the store is there.
            redis::cmd("PING").query::<()>(con).map(|()| Vec::new())
        } else {
            let mut call = self.script.prepare_invoke();
            call.arg(&self.field);
            for e in batch {
                call.key(&e.name);
                if e.local == 0 || e.local == e.tally.written.get(e.window) {
                    call.arg("-");
                } else {
                    call.arg(e.local);
                }
                call.arg(e.ttl_secs);
            }
            call.invoke(con)
        };
        let sums = match result {
            Ok(s) => s,
            Err(e) => {
                self.con = None;
                return Err(e);
            }
        };
        for (e, sum) in batch.iter().zip(sums) {
            e.tally.others.set(e.window, sum.saturating_sub(e.local));
            e.tally.written.set(e.window, e.local);
        }
        Ok(())
    }
}

/// A budget in the state file.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
struct Saved {
    period: BudgetPeriod,
    window: u64,
    tokens: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct StateFile {
    version: u32,
    /// By key id.
    budgets: BTreeMap<String, Saved>,
}

/// The thread's state.
pub struct Syncer {
    auth: AuthSource,
    metrics: Arc<Metrics>,
    redis: Option<Redis>,
    interval: Duration,
    /// Without a store: where budgets are kept, and what was last written there.
    state_path: PathBuf,
    written: BTreeMap<String, Saved>,
    /// The key table of the last full read; a reload makes a new one.
    seen: Option<Arc<Auth>>,
    /// Whether the store answered the last sync (for logging once per outage).
    up: Option<bool>,
}

impl Syncer {
    pub fn new(cfg: &Config, auth: AuthSource, metrics: Arc<Metrics>) -> Result<Self, String> {
        let redis = if cfg.limits_store.is_empty() {
            None
        } else {
            let client = redis::Client::open(cfg.limits_store.as_str())
                .map_err(|e| format!("limits_store: {e}"))?;
            let start = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            metrics.limits_store.store(2, Relaxed);
            Some(Redis {
                client,
                url: crate::url::redact(&cfg.limits_store),
                con: None,
                script: redis::Script::new(SYNC_SCRIPT),
                field: format!("{}:{}:{start}", hostname(), std::process::id()),
            })
        };
        Ok(Syncer {
            auth,
            metrics,
            redis,
            interval: cfg.limits_sync_interval.0,
            state_path: cfg.limits_state_path(),
            written: BTreeMap::new(),
            seen: None,
            up: None,
        })
    }

    /// Reads the budgets spent before this start (from the store, else the state
    /// file), before the first request.
    pub fn load(&mut self) {
        if self.redis.is_some() {
            self.tick();
            return;
        }
        let text = match std::fs::read(&self.state_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(
                    "limits state {}: {e}; budgets start from zero",
                    self.state_path.display()
                );
                return;
            }
        };
        let state: StateFile = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                error!(
                    "limits state {} is unreadable ({e}); budgets start from zero",
                    self.state_path.display()
                );
                return;
            }
        };
        let auth = (self.auth)();
        let clock = Clock::at(SystemTime::now());
        let mut restored = 0;
        for (digest, key) in auth.keys() {
            let (Some(b), Some(saved)) = (key.limits.budget, state.budgets.get(&key_id(digest)))
            else {
                continue;
            };
            let (w, _) = clock.budget_window(b.period);
            if saved.period == b.period && saved.window == w {
                key.counters.budget.local.add(w, saved.tokens);
                restored += 1;
            }
        }
        if restored > 0 {
            info!(
                "limits: {restored} budgets restored from {}",
                self.state_path.display()
            );
        }
        self.written = state.budgets;
    }

    /// Runs until `stop`, then syncs once more (a clean stop loses no count).
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let every = if self.redis.is_some() {
            self.interval
        } else {
            Duration::from_secs(1)
        };
        let mut next = Instant::now() + every;
        while !stop.load(Relaxed) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            self.tick();
            next = (next + every).max(Instant::now());
        }
        self.tick();
    }

    /// One sync: with a store, write and read the counts in use; without, save the
    /// budgets when they changed.
    pub fn tick(&mut self) {
        let auth = (self.auth)();
        let clock = Clock::at(SystemTime::now());
        if self.redis.is_some() {
            self.sync_store(&auth, &clock);
        } else {
            self.save_budgets(&auth, &clock);
        }
    }

    fn sync_store(&mut self, auth: &Arc<Auth>, clock: &Clock) {
        let full = !self.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, auth));
        let mut batch = Vec::new();
        for (digest, key) in auth.keys() {
            if key.limits.is_empty() {
                continue;
            }
            let recent = key
                .counters
                .last_used()
                .is_some_and(|m| m + 1 >= clock.minute);
            let start = batch.len();
            entries(&key_id(digest), key, clock, &mut batch);
            // Keys not in use here: read at start and after a reload (budgets), then
            // only when they come into use or charges arrive (a long stream's end).
            if !recent {
                let budget = &key.counters.budget;
                let mut i = start;
                while i < batch.len() {
                    let e = &batch[i];
                    let unwritten = e.local != e.tally.written.get(e.window);
                    if unwritten || (full && std::ptr::eq(e.tally, budget)) {
                        i += 1;
                    } else {
                        batch.swap_remove(i);
                    }
                }
            }
        }
        let Some(redis) = self.redis.as_mut() else {
            return;
        };
        let interval = self.interval;
        let failed = if batch.is_empty() {
            redis.sync(&[], interval).err()
        } else {
            batch
                .chunks(BATCH)
                .find_map(|chunk| redis.sync(chunk, interval).err())
        };
        match failed {
            None => {
                if full {
                    self.seen = Some(auth.clone());
                }
                if self.up != Some(true) {
                    if self.up == Some(false) {
                        info!(
                            "limits store {} reachable again: counts resynced",
                            redis.url
                        );
                    }
                    self.up = Some(true);
                }
                self.metrics.limits_store.store(1, Relaxed);
                self.metrics.limits_syncs.fetch_add(1, Relaxed);
            }
            Some(e) => {
                self.metrics.limits_sync_failures.fetch_add(1, Relaxed);
                self.metrics.limits_store.store(2, Relaxed);
                if self.up != Some(false) {
                    warn!(
                        "limits store {} unreachable ({e}): each proxy enforces limits on its own counts until it is back",
                        redis.url
                    );
                    self.up = Some(false);
                }
            }
        }
    }

    fn save_budgets(&mut self, auth: &Auth, clock: &Clock) {
        let mut now = BTreeMap::new();
        for (digest, key) in auth.keys() {
            let Some(b) = key.limits.budget else {
                continue;
            };
            let (window, _) = clock.budget_window(b.period);
            let tokens = key.counters.budget.local.get(window);
            if tokens > 0 {
                now.insert(
                    key_id(digest),
                    Saved {
                        period: b.period,
                        window,
                        tokens,
                    },
                );
            }
        }
        if now == self.written {
            return;
        }
        let state = StateFile {
            version: 1,
            budgets: now,
        };
        match write_atomically(&self.state_path, &state) {
            Ok(()) => self.written = state.budgets,
            Err(e) => {
                if self.up != Some(false) {
                    error!(
                        "limits state {}: {e} (budgets would restart from their last saved value)",
                        self.state_path.display()
                    );
                }
                self.up = Some(false);
                return;
            }
        }
        self.up = Some(true);
    }
}

/// Writes `state` beside `path`, syncs it, and renames it over `path`.
fn write_atomically(path: &std::path::Path, state: &StateFile) -> std::io::Result<()> {
    use std::io::Write;
    let body = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(Ok(d)) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(std::fs::File::open)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The running sync thread.
pub struct Running {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Running {
    /// Stops it after one last sync (the counts of the requests that just ended).
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        let _ = self.handle.join();
    }
}

/// Starts the sync thread when there is anything to sync: a store, or keys (whose
/// budgets a reload may add). Budgets spent before are read first.
pub fn start(
    cfg: &Config,
    auth: AuthSource,
    metrics: Arc<Metrics>,
) -> Result<Option<Running>, String> {
    if cfg.limits_store.is_empty() && !cfg.auth.enabled {
        return Ok(None);
    }
    let mut syncer = Syncer::new(cfg, auth, metrics)?;
    syncer.load();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::Builder::new()
        .name("limits-sync".into())
        .spawn(move || syncer.run(s))
        .map_err(|e| format!("cannot start the limits sync thread: {e}"))?;
    Ok(Some(Running { stop, handle }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_a_digest_prefix_in_hex() {
        let mut d = [0u8; 32];
        d[0] = 0xab;
        d[15] = 0x01;
        d[16] = 0xff;
        assert_eq!(key_id(&d), format!("ab{}01", "00".repeat(14)));
    }
}
