//! The memory-ordering protocol between readers and the writer, as small
//! functions over single atomic words. The shared-memory types call these;
//! the loom models (`tests/loom.rs`) call the same functions on loom's
//! atomics, so what is model-checked is what runs.
//!
//! Reader, per session:
//! 1. [`enter`]: load the global epoch (Acquire), store `epoch << 1 | ACTIVE`
//!    in its own slot (Release), then a SeqCst fence;
//! 2. walk the table with Acquire loads (no stores, no RMW);
//! 3. [`exit`]: store `QUIESCENT` with Release.
//!
//! Writer, per batch:
//! 1. clear or re-point entries (Release stores);
//! 2. [`advance`]: SeqCst fence, epoch + 1 (Release store), SeqCst fence;
//! 3. for every slot, wait until [`quiescent_since`] holds;
//! 4. only now complete the requests and reuse the detached nodes.
//!
//! Why it is enough: the two SeqCst fences are totally ordered. If the
//! writer's fence comes first, the reader's walk (after its fence) sees the
//! cleared entries. If the reader's fence comes first, the writer's slot load
//! (after its fence) sees the reader's ACTIVE store with an epoch older than
//! the new one, and waits for the Release store of `exit`, which orders every
//! load of the walk before the writer's reuse.

use crate::layout::liveness::{OWNER_DIED, TID_MASK};
use crate::layout::slots::{ACTIVE, CLOSED_VALUE, PIN_HELD, QUIESCENT, RETIRED_VALUE};
use crate::sync::{AtomicU64, Ordering, fence};

/// Starts a session in `slot`; returns the epoch it was entered in.
#[inline]
pub fn enter(global_epoch: &AtomicU64, slot: &AtomicU64) -> u64 {
    let epoch = global_epoch.load(Ordering::Acquire);
    // Release so that a writer which reads this newer state also sees the
    // pins published in this thread's earlier sessions.
    slot.store((epoch << 1) | ACTIVE, Ordering::Release);
    fence(Ordering::SeqCst);
    epoch
}

/// Whether the writer of the table is alive, from its liveness word
/// (`layout::liveness`). A session reads it after [`enter`]'s fence: a
/// session entered once the writer's death is visible faults every
/// translation.
#[inline]
pub fn writer_alive(liveness: &AtomicU64) -> bool {
    let word = liveness.load(Ordering::Acquire);
    word & TID_MASK != 0 && word & OWNER_DIED == 0
}

/// Whether a session that [`enter`]ed may translate: read after `enter`'s
/// fence. `liveness` is the writer's liveness word; `handover` whether the
/// table survives its writer ([`crate::layout::header::HANDOVER`]);
/// `retired` the slot file's retired word ([`retire`]).
#[inline]
pub fn session_usable(liveness: &AtomicU64, handover: bool, retired: &AtomicU64) -> bool {
    (handover || writer_alive(liveness)) && retired.load(Ordering::Acquire) != RETIRED_VALUE
}

/// Retires a reader's slot file: sessions [`enter`]ed from now on fault
/// ([`session_usable`]). The SeqCst fence orders the store before whatever
/// tells the writer (a message): a writer that then finds every slot
/// quiescent knows that no session can start translating any more, since
/// a session's fence comes either before this one (and the writer sees its
/// slot active) or after it (and the session sees the word).
pub fn retire(retired: &AtomicU64) {
    retired.store(RETIRED_VALUE, Ordering::SeqCst);
    fence(Ordering::SeqCst);
}

/// Whether the reader retired its slot file ([`retire`]).
pub fn slots_retired(retired: &AtomicU64) -> bool {
    retired.load(Ordering::Acquire) == RETIRED_VALUE
}

/// Marks a reader's slot file closed. The reader calls it once, after its
/// last session ended and its last pin was released, just before it unmaps
/// the file: the Release orders every earlier store to the file before it.
pub fn close_slots(closed: &AtomicU64) {
    closed.store(CLOSED_VALUE, Ordering::Release);
}

/// Whether the reader closed its slot file ([`close_slots`]); if so, the
/// writer may stop waiting for any of its slots and pins.
pub fn slots_closed(closed: &AtomicU64) -> bool {
    closed.load(Ordering::Acquire) == CLOSED_VALUE
}

/// Ends the session in `slot`.
#[inline]
pub fn exit(slot: &AtomicU64) {
    slot.store(QUIESCENT, Ordering::Release);
}

/// Publishes everything the writer stored so far as a new epoch and returns
/// it. Only the single writer calls this.
pub fn advance(global_epoch: &AtomicU64) -> u64 {
    fence(Ordering::SeqCst);
    let next = global_epoch.load(Ordering::Relaxed).wrapping_add(1) & (u64::MAX >> 1);
    global_epoch.store(next, Ordering::Release);
    fence(Ordering::SeqCst);
    next
}

/// Whether a slot no longer holds anything from before `epoch`: it is
/// outside a session, or its session began at `epoch` or later.
pub fn quiescent_since(slot: &AtomicU64, epoch: u64) -> bool {
    let state = slot.load(Ordering::Acquire);
    state & ACTIVE == 0 || (state >> 1) >= epoch
}

/// Whether a slot is outside any session (whatever epoch it last held).
pub fn outside_session(slot: &AtomicU64) -> bool {
    slot.load(Ordering::Acquire) & ACTIVE == 0
}

/// Publishes a pin record `{endpoint, first, last}`. Call inside a session,
/// before (or after) translating the range in that same session.
pub fn pin(state: &AtomicU64, fields: [&AtomicU64; 3], endpoint: u64, first: u64, last: u64) {
    let uses = state.load(Ordering::Relaxed) >> 1;
    fields[0].store(endpoint, Ordering::Relaxed);
    fields[1].store(first, Ordering::Relaxed);
    fields[2].store(last, Ordering::Relaxed);
    state.store(((uses.wrapping_add(1)) << 1) | PIN_HELD, Ordering::Release);
}

/// Releases a pin record once the I/O that used the range is over.
pub fn unpin(state: &AtomicU64) {
    let uses = state.load(Ordering::Relaxed) >> 1;
    state.store(uses << 1, Ordering::Release);
}

/// A pin as the writer sees it after a grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinSnapshot {
    /// The state word it was read under (to wait for it to change).
    pub state: u64,
    /// Endpoint ID.
    pub endpoint: u64,
    /// First pinned IOVA.
    pub first: u64,
    /// Last pinned IOVA (inclusive).
    pub last: u64,
}

/// Reads a pin record; `None` if it is not held.
pub fn read_pin(state: &AtomicU64, fields: [&AtomicU64; 3]) -> Option<PinSnapshot> {
    let s = state.load(Ordering::Acquire);
    if s & PIN_HELD == 0 {
        return None;
    }
    Some(PinSnapshot {
        state: s,
        endpoint: fields[0].load(Ordering::Relaxed),
        first: fields[1].load(Ordering::Relaxed),
        last: fields[2].load(Ordering::Relaxed),
    })
}

/// Whether the pin read as `snapshot` is still held (not released or reused).
pub fn pin_still_held(state: &AtomicU64, snapshot: &PinSnapshot) -> bool {
    state.load(Ordering::Acquire) == snapshot.state
}
