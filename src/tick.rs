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

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

/// How often a wait looks up from its socket, and the precision of every deadline.
pub const TICK: Duration = Duration::from_millis(100);

struct Clock {
    /// Ticks so far; a wait registered in one epoch is woken when it ends.
    epoch: Cell<u64>,
    /// The clock at the last tick (or at the last `now()` while parked), and the wall
    /// clock read with it.
    now: Cell<Option<(Instant, SystemTime)>>,
    /// Registered waits of this epoch; `None` slots are free (listed in `free`).
    waiters: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
    live: Cell<usize>,
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
            waiters: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            live: Cell::new(0),
            spawned: Cell::new(false),
            running: Cell::new(false),
            parked: RefCell::new(None),
        }
    };
}

fn read_clock() -> (Instant, SystemTime) {
    (Instant::now(), SystemTime::now())
}

/// Now, to within one `TICK`: for deadlines of waits, not for measuring.
pub fn now() -> Instant {
    CLOCK.with(|c| match c.now.get() {
        Some((t, _)) if c.running.get() => t,
        _ => {
            let r = read_clock();
            c.now.set(Some(r));
            r.0
        }
    })
}

/// The wall-clock time of `at`, an instant read recently (within a `TICK` or so):
/// the monotonic distance from the last tick's reading, added to its wall clock. A
/// request's timestamp and its durations then come from one clock read.
pub fn wall_time(at: Instant) -> SystemTime {
    CLOCK.with(|c| {
        let (t, w) = match c.now.get() {
            Some(r) if c.running.get() => r,
            _ => {
                let r = read_clock();
                c.now.set(Some(r));
                r
            }
        };
        match at.checked_duration_since(t) {
            Some(ahead) => w + ahead,
            None => w - t.duration_since(at),
        }
    })
}

/// Resolves at the next tick of this thread's clock.
pub fn next_tick() -> NextTick {
    NextTick {
        epoch: CLOCK.with(|c| c.epoch.get()),
        slot: None,
    }
}

pub struct NextTick {
    epoch: u64,
    slot: Option<usize>,
}

impl Future for NextTick {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        CLOCK.with(|c| {
            if c.epoch.get() != self.epoch {
                self.slot = None;
                return Poll::Ready(());
            }
            let mut waiters = c.waiters.borrow_mut();
            match self.slot {
                Some(i) => {
                    if let Some(Some(w)) = waiters.get_mut(i)
                        && !w.will_wake(cx.waker())
                    {
                        *w = cx.waker().clone();
                    }
                }
                None => {
                    let w = Some(cx.waker().clone());
                    let i = match c.free.borrow_mut().pop() {
                        Some(i) => {
                            waiters[i] = w;
                            i
                        }
                        None => {
                            waiters.push(w);
                            waiters.len() - 1
                        }
                    };
                    self.slot = Some(i);
                    c.live.set(c.live.get() + 1);
                    drop(waiters);
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
                if c.epoch.get() == self.epoch {
                    if let Some(slot) = c.waiters.borrow_mut().get_mut(i) {
                        *slot = None;
                    }
                    c.free.borrow_mut().push(i);
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
            c.epoch.set(c.epoch.get() + 1);
            c.now.set(Some(read_clock()));
            woken.extend(c.waiters.borrow_mut().drain(..).flatten());
            c.free.borrow_mut().clear();
            c.live.set(0);
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
                assert!(c.waiters.borrow().len() <= 1);
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
