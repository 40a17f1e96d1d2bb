//! The atomics the protocol is written against: `std`'s normally, `loom`'s
//! under `cfg(loom)` so the model checker can explore every interleaving
//! (the same shim crossbeam-epoch uses).

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU64, Ordering, fence};

/// What a waiting party does between two polls of a shared word.
#[cfg(loom)]
#[allow(dead_code)]
pub fn relax() {
    loom::thread::yield_now();
}

/// What a waiting party does between two polls of a shared word.
#[cfg(not(loom))]
pub fn relax() {
    std::hint::spin_loop();
}
