//! Per-key rate limits and token budgets, exact on one host: requests per minute,
//! tokens per minute, requests in flight, and a token budget per day, month or in all.
//!
//! Windows are **fixed and aligned to the wall clock** (UTC): the minute for `rpm` and
//! `tpm`, the UTC day or calendar month for a budget. A caller sees where a window ends
//! in the reset headers (`x-ratelimit-reset-requests: 12s` is the time to the next
//! minute). A fixed window lets a caller spend up to twice a limit across one window's
//! edge; it is what OpenAI-style per-minute headers describe and it needs one counter
//! per limit, where a sliding window needs a ring of them.
//!
//! Counters are atomics shared by every worker: a limit check is a few relaxed loads
//! and one compare-and-swap, with no lock. Each window counter is one `AtomicU64`
//! holding the window's number (high 24 bits) and its count (low 40 bits), so moving
//! to a new window and counting in it is one atomic step: no counter goes negative,
//! none overflows (counts saturate at 2^40 - 1), and a stale window reads as zero.
//!
//! Tokens are charged when the backend's usage is known (the record), so admission
//! checks what was charged so far: requests in flight when a token limit is crossed
//! still finish. The overshoot is at most what those requests use. A stream in
//! progress is never cut for a limit.
//!
//! Across proxies (`limits_store: redis://…`), each count is this proxy's own plus
//! everyone else's as the store last said (`Tally`); `store.rs` syncs the two every
//! `limits_sync_interval` off the request path. Without a store, `store.rs` keeps
//! budgets in a state file so a restart resets nothing.

pub mod store;

use crate::config::{Budget, BudgetPeriod, LimitsConfig};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const WINDOW_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;

/// A count in a fixed window, as one atomic word: (window number, count).
#[derive(Default, Debug)]
pub struct Window(AtomicU64);

fn pack(window: u64, count: u64) -> u64 {
    ((window & WINDOW_MASK) << COUNT_BITS) | count.min(COUNT_MASK)
}

fn count_in(word: u64, window: u64) -> u64 {
    if word >> COUNT_BITS == window & WINDOW_MASK {
        word & COUNT_MASK
    } else {
        0
    }
}

impl Window {
    /// The count in `window` (zero when the counter holds an older window).
    pub fn get(&self, window: u64) -> u64 {
        count_in(self.0.load(Relaxed), window)
    }

    /// Adds `n` in `window` if the count stays within `limit`: the count after, or
    /// `Err(count)` when it would not.
    pub fn try_add(&self, window: u64, n: u64, limit: u64) -> Result<u64, u64> {
        let mut word = self.0.load(Relaxed);
        loop {
            let now = count_in(word, window);
            let after = now.saturating_add(n);
            if after > limit {
                return Err(now);
            }
            match self
                .0
                .compare_exchange_weak(word, pack(window, after), Relaxed, Relaxed)
            {
                Ok(_) => return Ok(after.min(COUNT_MASK)),
                Err(w) => word = w,
            }
        }
    }

    /// Adds `n` in `window` whatever the count (tokens already used), saturating.
    pub fn add(&self, window: u64, n: u64) {
        let mut word = self.0.load(Relaxed);
        loop {
            let after = count_in(word, window).saturating_add(n);
            match self
                .0
                .compare_exchange_weak(word, pack(window, after), Relaxed, Relaxed)
            {
                Ok(_) => return,
                Err(w) => word = w,
            }
        }
    }

    /// Sets the count in `window` (the sync thread's view of the other proxies).
    pub fn set(&self, window: u64, count: u64) {
        self.0.store(pack(window, count), Relaxed);
    }

    /// Takes `n` back from `window` (a request counted, then refused by a later
    /// check), never below zero.
    pub fn sub(&self, window: u64, n: u64) {
        let mut word = self.0.load(Relaxed);
        loop {
            if word >> COUNT_BITS != window & WINDOW_MASK {
                return;
            }
            let after = (word & COUNT_MASK).saturating_sub(n);
            match self
                .0
                .compare_exchange_weak(word, pack(window, after), Relaxed, Relaxed)
            {
                Ok(_) => return,
                Err(w) => word = w,
            }
        }
    }
}

/// Where a request stands in time: the windows it counts in and how far each ends.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub minute: u64,
    /// Milliseconds to the next minute.
    pub minute_left_ms: u64,
    pub day: u64,
    pub day_left_ms: u64,
    pub month: u64,
    pub month_left_ms: u64,
}

impl Clock {
    pub fn at(t: SystemTime) -> Clock {
        let ms = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let day = ms / 86_400_000;
        let (y, m) = civil_month(day);
        let next_month_day = if m == 12 {
            days_from_civil(y + 1, 1)
        } else {
            days_from_civil(y, m + 1)
        };
        Clock {
            minute: ms / 60_000,
            minute_left_ms: 60_000 - ms % 60_000,
            day,
            day_left_ms: 86_400_000 - ms % 86_400_000,
            month: (y as u64) * 12 + (m as u64 - 1),
            month_left_ms: next_month_day.saturating_sub(day) * 86_400_000 - ms % 86_400_000,
        }
    }

    pub fn budget_window(&self, period: BudgetPeriod) -> (u64, Option<u64>) {
        match period {
            BudgetPeriod::Day => (self.day, Some(self.day_left_ms)),
            BudgetPeriod::Month => (self.month, Some(self.month_left_ms)),
            BudgetPeriod::Total => (0, None),
        }
    }
}

/// (year, month 1..=12) of a day number since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_month(day: u64) -> (i64, u32) {
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// The day number of the first of month `m` of year `y`.
fn days_from_civil(y: i64, m: u32) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468).max(0) as u64
}

/// One limit's count: this proxy's own, and the other proxies' as the store last said
/// (zero without a store). Only the sync thread writes `others` and `written`.
#[derive(Default, Debug)]
pub struct Tally {
    pub local: Window,
    pub others: Window,
    /// The local count the store last took.
    pub written: Window,
}

impl Tally {
    pub fn total(&self, window: u64) -> u64 {
        self.local
            .get(window)
            .saturating_add(self.others.get(window))
    }
}

/// One key's counters. Kept across a reload while the key stays configured.
#[derive(Default, Debug)]
pub struct Counters {
    pub requests: Tally,
    pub tokens: Tally,
    pub budget: Tally,
    in_flight: AtomicU32,
    /// The minute (+1) this key was last admitted: the sync pulls the keys in use.
    last_used: AtomicU64,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Requests,
    Tokens,
    Concurrency,
    Budget,
    /// `limits_fail_closed` and the store unreachable: a 503, not a 429.
    Store,
}

impl Refusal {
    /// Its slot in `Metrics::rate_limited`.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Requests => "rpm",
            Refusal::Tokens => "tpm",
            Refusal::Concurrency => "concurrency",
            Refusal::Budget => "budget",
            Refusal::Store => "store_down",
        }
    }
}

/// What the caller is told in the `x-ratelimit-*` headers (and `Retry-After`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    pub requests: Option<(u64, u64, u64)>,
    pub tokens: Option<(u64, u64, u64)>,
    /// Milliseconds until the refused limit frees up (a 429's `Retry-After`).
    pub retry_after_ms: u64,
}

/// A request admitted under its key's limits: holds its in-flight slot until dropped.
pub struct Permit<'a> {
    counters: &'a Counters,
    concurrent: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.concurrent {
            self.counters.in_flight.fetch_sub(1, Relaxed);
        }
    }
}

impl Counters {
    /// Admits a request under `limits` at `clock`, or says which limit refused it. The
    /// standing is for the response headers either way. `store_down`: refuse all
    /// (`limits_fail_closed` with the store unreachable).
    pub fn admit<'a>(
        &'a self,
        limits: &LimitsConfig,
        clock: &Clock,
        store_down: bool,
    ) -> (Result<Permit<'a>, Refusal>, Standing) {
        let mut st = Standing::default();
        if self.last_used.load(Relaxed) != clock.minute + 1 {
            self.last_used.store(clock.minute + 1, Relaxed);
        }
        if store_down {
            st.retry_after_ms = 1000;
            return (Err(Refusal::Store), st);
        }
        if let Some(tpm) = limits.tpm {
            let used = self.tokens.total(clock.minute);
            st.tokens = Some((tpm, tpm.saturating_sub(used), clock.minute_left_ms));
        }
        if let Some(Budget { tokens, period }) = limits.budget {
            let (w, left) = clock.budget_window(period);
            if self.budget.total(w) >= tokens {
                st.retry_after_ms = left.unwrap_or(0);
                return (Err(Refusal::Budget), st);
            }
        }
        if let Some((_, 0, reset)) = st.tokens {
            st.retry_after_ms = reset;
            return (Err(Refusal::Tokens), st);
        }
        let concurrent = match limits.max_concurrent {
            Some(max) => {
                let mut now = self.in_flight.load(Relaxed);
                loop {
                    if now >= max {
                        // Frees when a request ends: no time to promise; 1 s.
                        st.retry_after_ms = 1000;
                        return (Err(Refusal::Concurrency), st);
                    }
                    match self
                        .in_flight
                        .compare_exchange_weak(now, now + 1, Relaxed, Relaxed)
                    {
                        Ok(_) => break true,
                        Err(n) => now = n,
                    }
                }
            }
            None => false,
        };
        let permit = Permit {
            counters: self,
            concurrent,
        };
        if let Some(rpm) = limits.rpm {
            let others = self.requests.others.get(clock.minute);
            match self
                .requests
                .local
                .try_add(clock.minute, 1, rpm.saturating_sub(others))
            {
                Ok(count) => {
                    let used = count.saturating_add(others).min(rpm);
                    st.requests = Some((rpm, rpm - used, clock.minute_left_ms));
                }
                Err(_) => {
                    st.requests = Some((rpm, 0, clock.minute_left_ms));
                    st.retry_after_ms = clock.minute_left_ms;
                    return (Err(Refusal::Requests), st);
                }
            }
        }
        (Ok(permit), st)
    }

    /// Charges a finished request's tokens (its record's `total_tokens`).
    pub fn charge(&self, limits: &LimitsConfig, clock: &Clock, tokens: u64) {
        if tokens == 0 {
            return;
        }
        if limits.tpm.is_some() {
            self.tokens.local.add(clock.minute, tokens);
        }
        if let Some(b) = limits.budget {
            self.budget
                .local
                .add(clock.budget_window(b.period).0, tokens);
        }
    }

    /// The minute this key was last admitted in, if ever.
    pub fn last_used(&self) -> Option<u64> {
        self.last_used.load(Relaxed).checked_sub(1)
    }
}

/// A duration as OpenAI's reset headers write it: `1s`, `6m0s`, `250ms` (formatted
/// in place, no string of its own).
pub struct ResetText(u64);

pub fn reset_text(ms: u64) -> ResetText {
    ResetText(ms)
}

impl std::fmt::Display for ResetText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = Duration::from_millis(self.0).as_secs();
        match s {
            0 => write!(f, "{}ms", self.0),
            1..=59 => write!(f, "{s}s"),
            60..=3599 => write!(f, "{}m{}s", s / 60, s % 60),
            _ => write!(f, "{}h{}m{}s", s / 3600, s / 60 % 60, s % 60),
        }
    }
}

/// Appends the `x-ratelimit-*` header lines (and, when `refused`, `retry-after` and
/// `retry-after-ms`) for `st` to `out`, written straight into it.
pub fn write_headers(out: &mut Vec<u8>, st: &Standing, refused: Option<Refusal>) {
    use std::io::Write;
    if let Some((limit, remaining, reset)) = st.requests {
        let _ = write!(
            out,
            "x-ratelimit-limit-requests: {limit}\r\nx-ratelimit-remaining-requests: {remaining}\r\nx-ratelimit-reset-requests: {}\r\n",
            reset_text(reset)
        );
    }
    if let Some((limit, remaining, reset)) = st.tokens {
        let _ = write!(
            out,
            "x-ratelimit-limit-tokens: {limit}\r\nx-ratelimit-remaining-tokens: {remaining}\r\nx-ratelimit-reset-tokens: {}\r\n",
            reset_text(reset)
        );
    }
    if let Some(r) = refused {
        let _ = write!(
            out,
            "retry-after: {}\r\nretry-after-ms: {}\r\n",
            st.retry_after_ms.div_ceil(1000),
            st.retry_after_ms
        );
        // A spent budget does not come back by retrying (OpenAI's SDKs read this).
        if r == Refusal::Budget {
            out.extend_from_slice(b"x-should-retry: false\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(
        rpm: Option<u64>,
        tpm: Option<u64>,
        conc: Option<u32>,
        budget: Option<Budget>,
    ) -> LimitsConfig {
        LimitsConfig {
            rpm,
            tpm,
            max_concurrent: conc,
            budget,
        }
    }

    fn clock(ms: u64) -> Clock {
        Clock::at(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
    }

    #[test]
    fn rpm_is_exact_and_resets_at_the_minute() {
        let c = Counters::default();
        let l = limits(Some(3), None, None, None);
        let t = clock(1_700_000_000_000);
        for left in [2, 1, 0] {
            let (r, st) = c.admit(&l, &t, false);
            assert!(r.is_ok());
            assert_eq!(st.requests.unwrap().1, left);
        }
        let (r, st) = c.admit(&l, &t, false);
        assert_eq!(r.err(), Some(Refusal::Requests));
        assert_eq!(st.retry_after_ms, t.minute_left_ms);
        let next = clock(1_700_000_000_000 + t.minute_left_ms);
        assert!(c.admit(&l, &next, false).0.is_ok());
    }

    #[test]
    fn concurrency_frees_when_the_permit_drops() {
        let c = Counters::default();
        let l = limits(None, None, Some(2), None);
        let t = clock(0);
        let a = c.admit(&l, &t, false).0.unwrap();
        let _b = c.admit(&l, &t, false).0.unwrap();
        assert_eq!(c.admit(&l, &t, false).0.err(), Some(Refusal::Concurrency));
        drop(a);
        assert!(c.admit(&l, &t, false).0.is_ok());
    }

    #[test]
    fn a_refused_request_takes_no_rpm_and_no_slot() {
        let c = Counters::default();
        let l = limits(Some(10), Some(100), Some(1), None);
        let t = clock(0);
        c.charge(&l, &t, 100);
        assert_eq!(c.admit(&l, &t, false).0.err(), Some(Refusal::Tokens));
        assert_eq!(c.requests.total(t.minute), 0);
        assert_eq!(c.in_flight.load(Relaxed), 0);
    }

    #[test]
    fn tokens_and_budgets_are_charged_after_the_fact() {
        let c = Counters::default();
        let b = Budget {
            tokens: 1000,
            period: BudgetPeriod::Month,
        };
        let l = limits(None, Some(500), None, Some(b));
        let t = clock(1_700_000_000_000);
        assert!(c.admit(&l, &t, false).0.is_ok());
        c.charge(&l, &t, 600); // one request may overshoot
        let (r, st) = c.admit(&l, &t, false);
        assert_eq!(r.err(), Some(Refusal::Tokens));
        assert_eq!(st.tokens, Some((500, 0, t.minute_left_ms)));
        let later = clock(1_700_000_000_000 + 60_000);
        assert!(c.admit(&l, &later, false).0.is_ok());
        c.charge(&l, &later, 400);
        let (r, st) = c.admit(&l, &later, false);
        assert_eq!(r.err(), Some(Refusal::Budget));
        assert_eq!(st.retry_after_ms, later.month_left_ms);
    }

    #[test]
    fn other_proxies_counts_take_their_share_of_every_limit() {
        let c = Counters::default();
        let b = Budget {
            tokens: 100,
            period: BudgetPeriod::Day,
        };
        let l = limits(Some(5), Some(50), None, Some(b));
        let t = clock(1_700_000_000_000);
        c.requests.others.set(t.minute, 3);
        let (r, st) = c.admit(&l, &t, false);
        assert!(r.is_ok());
        assert_eq!(st.requests.unwrap().1, 1);
        assert!(c.admit(&l, &t, false).0.is_ok());
        assert_eq!(c.admit(&l, &t, false).0.err(), Some(Refusal::Requests));
        // More others than the limit (a sync after a burst elsewhere): refused, and
        // nothing counted here.
        c.requests.others.set(t.minute, 9);
        assert_eq!(c.admit(&l, &t, false).0.err(), Some(Refusal::Requests));
        assert_eq!(c.requests.local.get(t.minute), 2);
        let next = clock(1_700_000_000_000 + t.minute_left_ms);
        c.tokens.others.set(next.minute, 50);
        assert_eq!(c.admit(&l, &next, false).0.err(), Some(Refusal::Tokens));
        c.budget.others.set(next.day, 60);
        c.charge(&l, &next, 40);
        assert_eq!(c.admit(&l, &next, false).0.err(), Some(Refusal::Budget));
        // A stale view (an older window) counts nothing.
        let later = clock(1_700_000_000_000 + 86_400_000);
        assert!(c.admit(&l, &later, false).0.is_ok());
        assert_eq!(c.admit(&l, &later, true).0.err(), Some(Refusal::Store));
    }

    #[test]
    fn months_end_where_the_calendar_says() {
        // 2024-02-29T23:59:59Z: a leap day, one second to March.
        let t = clock(1_709_251_199_000);
        assert_eq!(t.month_left_ms, 1000);
        assert_eq!(t.day_left_ms, 1000);
        // 2023-12-31T00:00:00Z: a day to the new year.
        let t = clock(1_703_980_800_000);
        assert_eq!(t.month_left_ms, 86_400_000);
        assert_eq!(civil_month(0), (1970, 1));
        assert_eq!(days_from_civil(2024, 3), 19_783);
    }

    #[test]
    fn headers_read_like_openais() {
        let st = Standing {
            requests: Some((60, 0, 12_300)),
            tokens: Some((1000, 10, 61_000)),
            retry_after_ms: 12_300,
        };
        let mut out = Vec::new();
        write_headers(&mut out, &st, Some(Refusal::Requests));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("x-ratelimit-remaining-requests: 0\r\n"));
        assert!(text.contains("x-ratelimit-reset-requests: 12s\r\n"));
        assert!(text.contains("x-ratelimit-reset-tokens: 1m1s\r\n"));
        assert!(text.contains("retry-after: 13\r\nretry-after-ms: 12300\r\n"));
        assert!(!text.contains("x-should-retry"));
        assert_eq!(reset_text(250).to_string(), "250ms");
        assert_eq!(reset_text(3_723_000).to_string(), "1h2m3s");
    }

    proptest! {
        #[test]
        fn window_counts_never_go_negative_or_overflow(
            ops in proptest::collection::vec((0u64..4, 0u8..3, 0u64..(1 << 41)), 1..60),
            limit in 0u64..(1 << 41),
        ) {
            let w = Window::default();
            let mut model: (u64, u64) = (0, 0); // (window, count)
            for (win, op, n) in ops {
                let cur = if model.0 == win { model.1 } else { 0 };
                match op {
                    0 => {
                        let r = w.try_add(win, n, limit);
                        if cur.saturating_add(n) <= limit {
                            prop_assert_eq!(r, Ok(cur.saturating_add(n).min(COUNT_MASK)));
                            model = (win, cur.saturating_add(n).min(COUNT_MASK));
                        } else {
                            prop_assert_eq!(r, Err(cur));
                        }
                    }
                    1 => {
                        w.add(win, n);
                        model = (win, cur.saturating_add(n).min(COUNT_MASK));
                    }
                    _ => {
                        w.sub(win, n);
                        if model.0 == win {
                            model.1 = model.1.saturating_sub(n);
                        }
                    }
                }
                prop_assert_eq!(w.get(win), if model.0 == win { model.1 } else { 0 });
                prop_assert!(w.get(win) <= COUNT_MASK);
            }
        }

        #[test]
        fn window_ends_are_exact(ms in 0u64..4_102_444_800_000) {
            let t = clock(ms);
            prop_assert!(t.minute_left_ms >= 1 && t.minute_left_ms <= 60_000);
            prop_assert_eq!(clock(ms + t.minute_left_ms).minute, t.minute + 1);
            prop_assert_eq!(clock(ms + t.minute_left_ms - 1).minute, t.minute);
            prop_assert_eq!(clock(ms + t.month_left_ms).month, t.month + 1);
            prop_assert_eq!(clock(ms + t.month_left_ms - 1).month, t.month);
            prop_assert_eq!(clock(ms + t.day_left_ms).day, t.day + 1);
        }
    }
}
