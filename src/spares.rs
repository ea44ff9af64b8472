//! A worker thread's spares of one kind: what a closed connection or a finished request
//! leaves (read buffers, request buffers, head buffers, read cancellers) for the next
//! one to take instead of allocating. A bounded stack in a thread-local, with no lock
//! (a worker's tasks never leave its thread). Through `try_with`: on a thread being
//! torn down, taking finds nothing and keeping just drops.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Declare one as `thread_local! { static X: Spares<T> = const { RefCell::new(Vec::new()) }; }`.
pub type Spares<T> = RefCell<Vec<T>>;

/// The spare kept last, if there is one.
pub fn take<T: 'static>(spares: &'static LocalKey<Spares<T>>) -> Option<T> {
    spares.try_with(|s| s.borrow_mut().pop()).ok().flatten()
}

/// Keeps `item` unless `max` are kept already (then it is dropped).
pub fn keep<T: 'static>(spares: &'static LocalKey<Spares<T>>, item: T, max: usize) {
    let _ = spares.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < max {
            s.push(item);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static TEST: Spares<u32> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn spares_are_taken_last_kept_first_and_bounded() {
        assert_eq!(take(&TEST), None);
        for i in 0..5 {
            keep(&TEST, i, 3);
        }
        assert_eq!(
            (take(&TEST), take(&TEST), take(&TEST)),
            (Some(2), Some(1), Some(0))
        );
        assert_eq!(take(&TEST), None);
    }
}
