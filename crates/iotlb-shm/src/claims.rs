//! The numbered records (session slots, pin records) a reader process hands
//! out to its threads and I/Os: the lowest free one is claimed, so the
//! writer's scan stays short. Lock-free, one read-modify-write each way:
//! claiming and releasing pins is on every I/O's path.
//!
//! This is process-private bookkeeping, not part of the shared protocol.

use std::sync::atomic::{AtomicU64, Ordering};

/// A set of `count` records, each free or claimed.
#[derive(Debug)]
pub(crate) struct Claims {
    /// Bit `i % 64` of word `i / 64` is set while record `i` is claimed;
    /// bits past `count` are set for good.
    words: Box<[AtomicU64]>,
}

impl Claims {
    /// All `count` records free.
    pub(crate) fn new(count: usize) -> Self {
        let words = (0..count.div_ceil(64))
            .map(|w| {
                let valid = (count - w * 64).min(64);
                AtomicU64::new(if valid == 64 { 0 } else { !0 << valid })
            })
            .collect();
        Self { words }
    }

    /// Claims the lowest free record, if any.
    pub(crate) fn claim(&self) -> Option<usize> {
        for (w, word) in self.words.iter().enumerate() {
            let mut now = word.load(Ordering::Relaxed);
            while now != u64::MAX {
                let bit = (!now).trailing_zeros();
                // Acquire: the previous holder's use of the record (ended by
                // its Release in `release`) happens before ours.
                match word.compare_exchange_weak(
                    now,
                    now | 1 << bit,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Some(w * 64 + bit as usize),
                    Err(seen) => now = seen,
                }
            }
        }
        None
    }

    /// Frees a record claimed earlier.
    pub(crate) fn release(&self, index: usize) {
        if let Some(word) = self.words.get(index / 64) {
            word.fetch_and(!(1 << (index % 64)), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_record_is_claimed_and_the_count_is_a_bound() {
        for count in [2, 63, 64, 65, 130] {
            let c = Claims::new(count);
            let all: Vec<usize> = (0..count).map(|_| c.claim().unwrap()).collect();
            assert_eq!(all, (0..count).collect::<Vec<_>>());
            assert_eq!(c.claim(), None, "count {count}");
            c.release(count / 2);
            assert_eq!(c.claim(), Some(count / 2));
            c.release(0);
            c.release(count - 1);
            assert_eq!(c.claim(), Some(0));
            assert_eq!(c.claim(), Some(count - 1));
            assert_eq!(c.claim(), None);
        }
        let one = Claims::new(1);
        assert_eq!((one.claim(), one.claim()), (Some(0), None));
        assert_eq!(Claims::new(0).claim(), None);
    }

    #[test]
    fn threads_never_share_a_record() {
        let c = std::sync::Arc::new(Claims::new(100));
        let held: Vec<AtomicU64> = (0..100).map(|_| AtomicU64::new(0)).collect();
        let held = std::sync::Arc::new(held);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, held) = (c.clone(), held.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let Some(i) = c.claim() else { continue };
                        assert_eq!(held[i].fetch_add(1, Ordering::Relaxed), 0);
                        held[i].fetch_sub(1, Ordering::Relaxed);
                        c.release(i);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!((0..100).filter_map(|_| c.claim()).count(), 100);
    }
}
