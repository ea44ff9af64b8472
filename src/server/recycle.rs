//! A boxed future whose allocation the next one of the same layout on this thread
//! reuses. A request's state is boxed so that an idle connection does not carry it
//! (docs/performance.md: "Memory per connection"); at ~3.5 KiB and over-aligned, a
//! fresh box a request went through glibc's slow path every time (`posix_memalign`,
//! the bins, fastbin consolidation: ~2 % of a keep-alive JSON request's worker CPU in
//! `benches/profile.sh`). Worker threads never move a task to another thread, and at
//! most `KEEP` spare allocations wait per thread.

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Spare allocations kept per thread (each the size of one request's state).
const KEEP: usize = 64;

/// A thread's spare allocations, given back to the allocator when the thread ends.
struct Spares(Vec<(NonNull<u8>, Layout)>);

impl Drop for Spares {
    fn drop(&mut self) {
        for (p, layout) in self.0.drain(..) {
            // SAFETY: each spare was allocated with `layout` and is owned by the list.
            unsafe { dealloc(p.as_ptr(), layout) };
        }
    }
}

thread_local! {
    static SPARE: RefCell<Spares> = const { RefCell::new(Spares(Vec::new())) };
}

/// `Box::pin(future)`, with the allocation taken from and given back to this thread's
/// spares.
pub struct Recycled<F> {
    ptr: NonNull<F>,
}

impl<F: Future> Recycled<F> {
    pub fn new(future: F) -> Self {
        let layout = Layout::new::<F>();
        let ptr: NonNull<F> = if layout.size() == 0 {
            NonNull::dangling()
        } else {
            let spare = SPARE
                .try_with(|s| {
                    let s = &mut s.borrow_mut().0;
                    match s.last() {
                        Some(&(p, l)) if l == layout => s.pop().map(|_| p),
                        _ => None,
                    }
                })
                .ok()
                .flatten();
            spare
                .unwrap_or_else(|| {
                    // SAFETY: `layout` has a non-zero size.
                    let p = unsafe { alloc(layout) };
                    NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout))
                })
                .cast()
        };
        // SAFETY: `ptr` is valid for writes of an `F` and properly aligned (allocated
        // with `F`'s layout, or dangling for a zero-sized `F`).
        unsafe { ptr.as_ptr().write(future) };
        Recycled { ptr }
    }
}

impl<F: Future> Future for Recycled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future lives at `ptr` until `drop` and is never moved out of it,
        // so it stays pinned.
        unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()) }.poll(cx)
    }
}

impl<F> Drop for Recycled<F> {
    fn drop(&mut self) {
        let layout = Layout::new::<F>();
        // SAFETY: `ptr` holds an initialised `F` that nothing else owns.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        if layout.size() == 0 {
            return;
        }
        let p = self.ptr.cast::<u8>();
        let kept = SPARE
            .try_with(|s| {
                let s = &mut s.borrow_mut().0;
                let room = s.len() < KEEP;
                if room {
                    s.push((p, layout));
                }
                room
            })
            .unwrap_or(false);
        if !kept {
            // SAFETY: allocated with `layout` above, and no longer used.
            unsafe { dealloc(p.as_ptr(), layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    async fn work(n: u64, dropped: Rc<()>) -> u64 {
        let _keep = dropped;
        let buf = [n as u8; 512];
        std::future::ready(()).await;
        buf.iter().map(|&b| b as u64).sum()
    }

    #[test]
    fn reuses_the_allocation_and_drops_the_future() {
        let token = Rc::new(());
        let rt = &mut monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime");
        let first = Recycled::new(work(1, token.clone()));
        let at = first.ptr.as_ptr() as usize;
        assert_eq!(rt.block_on(first), 512);
        let second = Recycled::new(work(2, token.clone()));
        assert_eq!(second.ptr.as_ptr() as usize, at, "the spare was not reused");
        // Dropped before it ran: its captures are dropped all the same.
        drop(second);
        assert_eq!(Rc::strong_count(&token), 1);
        let spares = SPARE.with(|s| s.borrow().0.len());
        let many: Vec<_> = (0..KEEP + 8)
            .map(|i| Recycled::new(work(i as u64, token.clone())))
            .collect();
        drop(many);
        assert_eq!(SPARE.with(|s| s.borrow().0.len()), KEEP.max(spares));
        assert_eq!(Rc::strong_count(&token), 1);
    }
}
