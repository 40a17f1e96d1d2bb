//! loom models of the reader/writer protocol in `iotlb_shm::grace`, run
//! with: `RUSTFLAGS="--cfg loom" cargo test -p iotlb-shm --test loom --release`.
//!
//! The words stand for: `epoch` the header's global epoch, `slot` a reader
//! slot, `entry` a page-table entry that points at `node` (1) or is clear
//! (0), `node` the contents of the node or leaf it points at — `LIVE` while
//! mapped, `RECYCLED` once the writer reused it for something else.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;

use iotlb_shm::grace;
use iotlb_shm::{AtomicU64, Ordering};

const LIVE: u64 = 7;
const RECYCLED: u64 = 0xdead;

struct Table {
    epoch: AtomicU64,
    entry: AtomicU64,
    node: AtomicU64,
    slots: [AtomicU64; 2],
    pin_state: AtomicU64,
    pin_fields: [AtomicU64; 3],
}

impl Table {
    fn mapped() -> Arc<Self> {
        Arc::new(Self {
            epoch: AtomicU64::new(1),
            entry: AtomicU64::new(1),
            node: AtomicU64::new(LIVE),
            slots: [AtomicU64::new(0), AtomicU64::new(0)],
            pin_state: AtomicU64::new(0),
            pin_fields: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
        })
    }

    fn pin_fields(&self) -> [&AtomicU64; 3] {
        [
            &self.pin_fields[0],
            &self.pin_fields[1],
            &self.pin_fields[2],
        ]
    }

    /// A lookup: follow the entry, read what it points at.
    fn walk(&self) -> Option<u64> {
        (self.entry.load(Ordering::Acquire) == 1).then(|| self.node.load(Ordering::Acquire))
    }

    /// The writer's UNMAP + grace period + reuse of the node.
    fn revoke_and_recycle(&self, wait_pins: bool) {
        self.entry.store(0, Ordering::Release);
        let epoch = grace::advance(&self.epoch);
        for slot in &self.slots {
            while !grace::quiescent_since(slot, epoch) {
                thread::yield_now();
            }
        }
        if wait_pins {
            if let Some(snap) = grace::read_pin(&self.pin_state, self.pin_fields()) {
                if snap.first <= 0x1fff && 0x1000 <= snap.last {
                    while grace::pin_still_held(&self.pin_state, &snap) {
                        thread::yield_now();
                    }
                }
            }
        }
        self.node.store(RECYCLED, Ordering::Relaxed);
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// A reader that saw the entry never sees the node recycled during its
/// session, whichever way the writer's epoch bump and the reader's entry
/// interleave.
#[test]
fn revocation_waits_for_every_session_that_may_hold_the_entry() {
    model(|| {
        let t = Table::mapped();
        let readers: Vec<_> = (0..2)
            .map(|i| {
                let t = t.clone();
                thread::spawn(move || {
                    grace::enter(&t.epoch, &t.slots[i]);
                    if let Some(v) = t.walk() {
                        assert_eq!(v, LIVE, "reader {i} saw a recycled node inside its session");
                    }
                    grace::exit(&t.slots[i]);
                })
            })
            .collect();
        t.revoke_and_recycle(false);
        for r in readers {
            r.join().unwrap();
        }
    });
}

/// A session that begins after the grace period cannot see the old entry.
#[test]
fn a_session_after_the_grace_period_sees_the_revocation() {
    model(|| {
        let t = Table::mapped();
        let done = Arc::new(AtomicU64::new(0));
        let (t2, done2) = (t.clone(), done.clone());
        let reader = thread::spawn(move || {
            let completed = done2.load(Ordering::Acquire);
            grace::enter(&t2.epoch, &t2.slots[0]);
            let seen = t2.walk();
            grace::exit(&t2.slots[0]);
            if completed == 1 {
                assert_eq!(
                    seen, None,
                    "use after unmap: session began after the UNMAP completed"
                );
            }
        });
        t.revoke_and_recycle(false);
        done.store(1, Ordering::Release);
        reader.join().unwrap();
    });
}

/// MAP: contents stored before the entry (Release) are what a reader that
/// sees the entry reads.
#[test]
fn a_published_entry_is_seen_with_its_contents() {
    model(|| {
        let t = Arc::new(Table {
            entry: AtomicU64::new(0),
            node: AtomicU64::new(0),
            ..Arc::try_unwrap(Table::mapped()).ok().unwrap()
        });
        let t2 = t.clone();
        let reader = thread::spawn(move || {
            grace::enter(&t2.epoch, &t2.slots[0]);
            if let Some(v) = t2.walk() {
                assert_eq!(v, LIVE, "entry visible before the node's contents");
            }
            grace::exit(&t2.slots[0]);
        });
        t.node.store(LIVE, Ordering::Relaxed);
        t.entry.store(1, Ordering::Release);
        reader.join().unwrap();
    });
}

/// A pin taken in a session keeps the range alive after the session ends,
/// until unpinned, even if the same thread has entered a newer session
/// meanwhile (the writer then learns of the pin through the newer slot
/// state).
#[test]
fn a_pin_outlives_its_session_and_holds_the_revocation() {
    model(|| {
        let t = Table::mapped();
        let t2 = t.clone();
        let reader = thread::spawn(move || {
            grace::enter(&t2.epoch, &t2.slots[0]);
            grace::pin(&t2.pin_state, t2.pin_fields(), 1, 0x1000, 0x1fff);
            let seen = t2.walk();
            grace::exit(&t2.slots[0]);
            // A later, unrelated session of the same thread.
            grace::enter(&t2.epoch, &t2.slots[0]);
            grace::exit(&t2.slots[0]);
            // The I/O uses the pinned translation now.
            if seen.is_some() {
                assert_eq!(
                    t2.node.load(Ordering::Acquire),
                    LIVE,
                    "node recycled under a pin"
                );
            }
            grace::unpin(&t2.pin_state);
        });
        t.revoke_and_recycle(true);
        reader.join().unwrap();
    });
}

/// A reader that closes its slot file after its last session (what the
/// library does when its last handle goes) may be skipped by a writer that
/// sees the file closed: everything the reader did happened before.
#[test]
fn a_closed_slot_file_is_skipped_only_after_its_last_session() {
    model(|| {
        let t = Table::mapped();
        let closed = Arc::new(AtomicU64::new(0));
        let (t2, closed2) = (t.clone(), closed.clone());
        let reader = thread::spawn(move || {
            grace::enter(&t2.epoch, &t2.slots[0]);
            if let Some(v) = t2.walk() {
                assert_eq!(v, LIVE, "node recycled inside the last session");
            }
            grace::exit(&t2.slots[0]);
            grace::close_slots(&closed2);
        });
        t.entry.store(0, Ordering::Release);
        let epoch = grace::advance(&t.epoch);
        while !grace::slots_closed(&closed) && !grace::quiescent_since(&t.slots[0], epoch) {
            thread::yield_now();
        }
        t.node.store(RECYCLED, Ordering::Relaxed);
        reader.join().unwrap();
    });
}

/// The writer's death, once anyone has seen it, is seen by every session
/// that begins afterwards: such a session faults instead of translating.
#[test]
fn a_session_that_begins_after_the_writer_died_sees_it_dead() {
    use iotlb_shm::layout::liveness::OWNER_DIED;
    model(|| {
        let liveness = Arc::new(AtomicU64::new(1234)); // a writer thread's TID
        let seen_dead = Arc::new(AtomicU64::new(0));
        let t = Table::mapped();
        let (l1, s1) = (liveness.clone(), seen_dead.clone());
        // Someone (the restarted daemon, the operator) sees the death and
        // only then lets the backend begin a session.
        let witness = thread::spawn(move || {
            while grace::writer_alive(&l1) {
                thread::yield_now();
            }
            s1.store(1, Ordering::Release);
        });
        let (l2, s2, t2) = (liveness.clone(), seen_dead.clone(), t.clone());
        let reader = thread::spawn(move || {
            while s2.load(Ordering::Acquire) == 0 {
                thread::yield_now();
            }
            grace::enter(&t2.epoch, &t2.slots[0]);
            assert!(
                !grace::writer_alive(&l2),
                "a session begun after the death was seen took the writer for alive"
            );
            grace::exit(&t2.slots[0]);
        });
        // The kernel, as the writer's liveness thread exits.
        liveness.store(OWNER_DIED, Ordering::Release);
        witness.join().unwrap();
        reader.join().unwrap();
    });
}

/// A restarted daemon and the previous daemon's frozen table: the backend
/// retires its slot file of that table and hands it over; the new daemon
/// completes a revocation (here: lets the page be reused) only once every
/// slot of the retired file is outside a session. A session either began
/// before the retirement — and is waited for — or sees the file retired and
/// translates nothing.
#[test]
fn a_retired_slot_file_is_waited_for_or_its_session_translates_nothing() {
    use iotlb_shm::layout::liveness::OWNER_DIED;
    model(|| {
        let t = Table::mapped();
        // The previous daemon is dead; its table survives it.
        let liveness = Arc::new(AtomicU64::new(OWNER_DIED));
        let retired = Arc::new(AtomicU64::new(0));
        let handed_over = Arc::new(AtomicU64::new(0));
        let (t2, l2, r2) = (t.clone(), liveness.clone(), retired.clone());
        let queue_thread = thread::spawn(move || {
            grace::enter(&t2.epoch, &t2.slots[0]);
            if grace::session_usable(&l2, true, &r2) {
                if let Some(v) = t2.walk() {
                    assert_eq!(v, LIVE, "translated a page the new daemon let be reused");
                }
            }
            grace::exit(&t2.slots[0]);
        });
        let (r3, h3) = (retired.clone(), handed_over.clone());
        let reconnecting_thread = thread::spawn(move || {
            grace::retire(&r3);
            // PREVIOUS_TABLE on the socket: a Release/Acquire pair.
            h3.store(1, Ordering::Release);
        });
        // The new daemon, after the revocation's own grace period.
        while handed_over.load(Ordering::Acquire) == 0 {
            thread::yield_now();
        }
        assert!(grace::slots_retired(&retired));
        while !grace::outside_session(&t.slots[0]) {
            thread::yield_now();
        }
        t.node.store(RECYCLED, Ordering::Relaxed);
        queue_thread.join().unwrap();
        reconnecting_thread.join().unwrap();
    });
}
