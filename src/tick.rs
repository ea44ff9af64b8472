//! One clock per worker thread for every wait that needs to look up now and then.
//!
//! Waits on sockets are given up on deadlines of seconds (header, idle, first byte,
//! write stall) and look up every `TICK` for a caller that hung up or a shutdown. A
//! monoio timer per wait cost, on every read and write, a clock read, a timer-wheel
//! insert and removal, and `select!`'s random branch choice: about 3 % of a worker
//! relaying short responses. Here one ticker task per worker sleeps `TICK`, reads the
//! clock once, and wakes every wait registered since its last tick; a wait costs a
//! slot in a vector. Deadlines are checked against the tick's clock reading, so they
//! hold to within one `TICK`, as they did with a timer per wait.
//!
//! `now()` is that reading while the ticker runs (at most one `TICK` old), and a
//! real clock read while it is parked (no wait registered), so a deadline is never
//! computed from a stale clock.
//!
//! A wait that has nothing to look at but its deadline (an idle keep-alive connection)
//! asks to be woken up to `WHEEL - 1` ticks later (`after`), not every tick: waits sit
//! in a wheel of `WHEEL` buckets, one per coming tick. `wake_all` wakes every wait at
//! once (a worker shutting down).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

/// How often a wait looks up from its socket, and the precision of every deadline.
pub const TICK: Duration = Duration::from_millis(100);

/// Buckets of the wheel: the farthest a wait can be is `WHEEL - 1` ticks ahead.
pub const WHEEL: u64 = 16;
const EMPTY: Vec<Option<Waker>> = Vec::new();
const NONE: Vec<usize> = Vec::new();

struct Clock {
    /// Ticks so far; a wait registered in one epoch is woken when it ends.
    epoch: Cell<u64>,
    /// The clock at the last tick (or at the last `now()` while parked), and the wall
    /// clock read with it.
    now: Cell<Option<(Instant, SystemTime)>>,
    /// Registered waits by the tick they are due at (bucket `due % WHEEL`); `None`
    /// slots are free (listed in `free`).
    wheel: RefCell<[Vec<Option<Waker>>; WHEEL as usize]>,
    free: RefCell<[Vec<usize>; WHEEL as usize]>,
    live: Cell<usize>,
    /// Bumped by `wake_all`: every wait registered before is due.
    round: Cell<u64>,
    /// The ticker task exists (it is spawned by the first wait on this thread).
    spawned: Cell<bool>,
    /// The ticker is between ticks (so `now` is fresh); otherwise it is parked.
    running: Cell<bool>,
    /// The parked ticker's waker.
    parked: RefCell<Option<Waker>>,
}

thread_local! {
    static CLOCK: Clock = const {
        Clock {
            epoch: Cell::new(0),
            now: Cell::new(None),
            wheel: RefCell::new([EMPTY; WHEEL as usize]),
            free: RefCell::new([NONE; WHEEL as usize]),
            live: Cell::new(0),
            round: Cell::new(0),
            spawned: Cell::new(false),
            running: Cell::new(false),
            parked: RefCell::new(None),
        }
    };
}

fn read_clock() -> (Instant, SystemTime) {
    (Instant::now(), SystemTime::now())
}

/// The last tick's clock reading while the ticker runs, a fresh one while it is parked.
fn reading(c: &Clock) -> (Instant, SystemTime) {
    match c.now.get() {
        Some(r) if c.running.get() => r,
        _ => {
            let r = read_clock();
            c.now.set(Some(r));
            r
        }
    }
}

/// Now, to within one `TICK`: for deadlines of waits, not for measuring.
pub fn now() -> Instant {
    CLOCK.with(|c| reading(c).0)
}

/// The wall-clock time of `at`, an instant read recently (within a `TICK` or so):
/// the monotonic distance from the last tick's reading, added to its wall clock. A
/// request's timestamp and its durations then come from one clock read.
pub fn wall_time(at: Instant) -> SystemTime {
    CLOCK.with(|c| {
        let (t, w) = reading(c);
        match at.checked_duration_since(t) {
            Some(ahead) => w + ahead,
            None => w - t.duration_since(at),
        }
    })
}

/// What ended a wait for an operation or a tick.
pub enum Either<T> {
    Done(T),
    Tick,
}

/// Polls `op` and then `tick` (the operation first: bytes that are there are taken
/// before a tick is looked at). A hand-written `select!` of two: no random branch
/// choice, no futures moved into a tuple.
pub async fn first_of<F: Future>(mut op: Pin<&mut F>, tick: NextTick) -> Either<F::Output> {
    let mut tick = std::pin::pin!(tick);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = op.as_mut().poll(cx) {
            return Poll::Ready(Either::Done(r));
        }
        tick.as_mut().poll(cx).map(|()| Either::Tick)
    })
    .await
}

/// Resolves at the next tick of this thread's clock.
pub fn next_tick() -> NextTick {
    after(1)
}

/// Resolves `ticks` ticks from now (1 to `WHEEL - 1`), or at `wake_all`.
pub fn after(ticks: u64) -> NextTick {
    CLOCK.with(|c| NextTick {
        due: c.epoch.get() + ticks.clamp(1, WHEEL - 1),
        round: c.round.get(),
        slot: None,
    })
}

/// How many ticks until `deadline` (at least 1), for `after`.
pub fn ticks_until(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(now());
    (left.as_millis() / TICK.as_millis()) as u64 + 1
}

/// Wakes every wait registered on this thread now (they see what changed, such as a
/// shutdown, without waiting for their tick).
pub fn wake_all() {
    let woken: Vec<Waker> = CLOCK.with(|c| {
        c.round.set(c.round.get() + 1);
        c.live.set(0);
        c.free.borrow_mut().iter_mut().for_each(Vec::clear);
        c.wheel
            .borrow_mut()
            .iter_mut()
            .flat_map(|b| b.drain(..).flatten())
            .collect()
    });
    woken.into_iter().for_each(Waker::wake);
}

pub struct NextTick {
    due: u64,
    round: u64,
    slot: Option<usize>,
}

impl NextTick {
    fn is_due(&self, c: &Clock) -> bool {
        c.epoch.get() >= self.due || c.round.get() != self.round
    }
}

impl Future for NextTick {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        CLOCK.with(|c| {
            if self.is_due(c) {
                self.slot = None;
                return Poll::Ready(());
            }
            let b = (self.due % WHEEL) as usize;
            let mut wheel = c.wheel.borrow_mut();
            match self.slot {
                Some(i) => {
                    if let Some(Some(w)) = wheel[b].get_mut(i)
                        && !w.will_wake(cx.waker())
                    {
                        *w = cx.waker().clone();
                    }
                }
                None => {
                    let w = Some(cx.waker().clone());
                    let bucket = &mut wheel[b];
                    let i = match c.free.borrow_mut()[b].pop() {
                        Some(i) => {
                            bucket[i] = w;
                            i
                        }
                        None => {
                            bucket.push(w);
                            bucket.len() - 1
                        }
                    };
                    self.slot = Some(i);
                    c.live.set(c.live.get() + 1);
                    drop(wheel);
                    start_ticker(c);
                }
            }
            Poll::Pending
        })
    }
}

impl Drop for NextTick {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            // try_with: a wait dropped while the thread's locals are torn down.
            let _ = CLOCK.try_with(|c| {
                if !self.is_due(c) {
                    let b = (self.due % WHEEL) as usize;
                    if let Some(slot) = c.wheel.borrow_mut()[b].get_mut(i) {
                        *slot = None;
                    }
                    c.free.borrow_mut()[b].push(i);
                    c.live.set(c.live.get() - 1);
                }
            });
        }
    }
}

fn start_ticker(c: &Clock) {
    if !c.spawned.get() {
        c.spawned.set(true);
        c.running.set(true);
        c.now.set(Some(read_clock()));
        monoio::spawn(ticker());
    } else if !c.running.get() {
        c.running.set(true);
        c.now.set(Some(read_clock()));
        if let Some(w) = c.parked.borrow_mut().take() {
            w.wake();
        }
    }
}

async fn ticker() {
    let mut woken: Vec<Waker> = Vec::new();
    loop {
        // Parked while nothing waits: an idle thread is not woken for nothing.
        std::future::poll_fn(|cx| {
            CLOCK.with(|c| {
                if c.live.get() > 0 {
                    c.running.set(true);
                    Poll::Ready(())
                } else {
                    c.running.set(false);
                    *c.parked.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
        })
        .await;
        monoio::time::sleep(TICK).await;
        CLOCK.with(|c| {
            let epoch = c.epoch.get() + 1;
            c.epoch.set(epoch);
            c.now.set(Some(read_clock()));
            let b = (epoch % WHEEL) as usize;
            let before = woken.len();
            woken.extend(c.wheel.borrow_mut()[b].drain(..).flatten());
            c.free.borrow_mut()[b].clear();
            c.live
                .set(c.live.get().saturating_sub(woken.len() - before));
        });
        for w in woken.drain(..) {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn a_tick_comes_within_one_period_and_wakes_every_wait() {
        rt().block_on(async {
            let start = Instant::now();
            let a = monoio::spawn(next_tick());
            let b = monoio::spawn(next_tick());
            a.await;
            b.await;
            let took = start.elapsed();
            assert!(took <= TICK * 3, "{took:?}");
            // The clock was read at the tick.
            assert!(now() >= start);
        });
    }

    #[test]
    fn a_dropped_wait_frees_its_slot_and_the_ticker_parks() {
        rt().block_on(async {
            for _ in 0..100 {
                let mut t = std::pin::pin!(next_tick());
                let waker = futures_noop_waker();
                let mut cx = Context::from_waker(&waker);
                assert!(t.as_mut().poll(&mut cx).is_pending());
            }
            CLOCK.with(|c| {
                assert_eq!(c.live.get(), 0);
                assert!(c.wheel.borrow().iter().all(|b| b.len() <= 1));
            });
            // With nothing waiting the ticker parks after its tick, and `now` reads
            // the real clock.
            next_tick().await;
            monoio::time::sleep(TICK * 2).await;
            CLOCK.with(|c| assert!(!c.running.get()));
            let before = Instant::now();
            assert!(now() >= before);
        });
    }

    #[test]
    fn a_later_wait_comes_after_its_ticks_and_wake_all_brings_it_forward() {
        rt().block_on(async {
            // Keep the ticker running on its own schedule.
            let start = Instant::now();
            after(3).await;
            let took = start.elapsed();
            assert!(took >= TICK * 2 && took <= TICK * 5, "{took:?}");

            let late = monoio::spawn(async {
                let t = Instant::now();
                after(WHEEL - 1).await;
                t.elapsed()
            });
            let dropped = monoio::spawn(async {
                let t = std::pin::pin!(after(10));
                let waker = Waker::noop().clone();
                let mut cx = Context::from_waker(&waker);
                let mut t = t;
                assert!(t.as_mut().poll(&mut cx).is_pending());
            });
            dropped.await;
            monoio::time::sleep(TICK).await;
            wake_all();
            let waited = late.await;
            assert!(
                waited < TICK * 4,
                "woken by wake_all, not after 15 ticks: {waited:?}"
            );
            CLOCK.with(|c| assert_eq!(c.live.get(), 0));
        });
    }

    #[test]
    fn ticks_until_rounds_up() {
        rt().block_on(async {
            assert_eq!(ticks_until(now()), 1);
            assert!(ticks_until(now() + TICK * 20) >= 20);
        });
    }

    #[test]
    fn wall_time_follows_the_monotonic_clock() {
        rt().block_on(async {
            let t = Instant::now();
            let w = wall_time(t);
            let real = SystemTime::now();
            let diff = real.duration_since(w).unwrap_or_else(|e| e.duration());
            assert!(diff < Duration::from_millis(50), "{diff:?}");
            let later = wall_time(t + Duration::from_secs(2));
            let apart = later.duration_since(w).unwrap();
            assert!(apart.abs_diff(Duration::from_secs(2)) < Duration::from_millis(50));
        });
    }

    fn futures_noop_waker() -> Waker {
        Waker::noop().clone()
    }
}
