//! The writer's liveness word (`layout::liveness`): a robust futex that the
//! kernel marks `OWNER_DIED` when the writer process ends, however it ends
//! (exit, crash, `SIGKILL`), before its descriptors close. Readers check it
//! when they enter a session, so a backend never translates through the
//! frozen table of a dead daemon, unless the table says it survives its
//! writer (`layout::header::HANDOVER`, the daemon's `--state-dir`).
//!
//! A thread of the writer process owns the word: it registers a robust
//! list (`set_robust_list(2)`) that holds only this word, stores its thread
//! ID in it, and parks. Dropping the [`LivenessOwner`] marks the word dead
//! first, then lets the thread restore the C library's robust list and
//! exit.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::layout::liveness::OWNER_DIED;
use crate::sync::{AtomicU64, Ordering};

/// `struct robust_list` of the kernel ABI.
#[repr(C)]
struct RobustList {
    next: *mut RobustList,
}

/// `struct robust_list_head` of the kernel ABI.
#[repr(C)]
struct RobustListHead {
    list: RobustList,
    futex_offset: libc::c_long,
    list_op_pending: *mut RobustList,
}

/// The address of the liveness word, sent to the owning thread.
#[derive(Clone, Copy)]
struct WordAddress(usize);

/// Keeps the liveness word alive for as long as it exists.
#[derive(Debug)]
pub struct LivenessOwner {
    word: WordAddress,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WordAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl LivenessOwner {
    /// Starts the owning thread for the word at `word` and returns once the
    /// word says "alive".
    ///
    /// # Safety
    /// `word` must be an 8-aligned word of a writable shared mapping that
    /// stays mapped until the returned value is dropped.
    pub unsafe fn start(word: *const AtomicU64) -> io::Result<Self> {
        let address = WordAddress(word as usize);
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("iotlb-liveness".into())
            .spawn(move || own(address, &ready_tx, &stop_rx))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                word: address,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other("the liveness thread ended early")),
        }
    }
}

impl Drop for LivenessOwner {
    fn drop(&mut self) {
        // SAFETY: `start`'s contract keeps the word mapped until now.
        let word = unsafe { AtomicU64::from_ptr(self.word.0 as *mut u64) };
        word.store(OWNER_DIED, Ordering::Release);
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_robust_list(head: *const RobustListHead) -> io::Result<()> {
    // SAFETY: the kernel only records the pointer; it reads the list when
    // this thread exits, and `own` keeps it valid until it is replaced.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_set_robust_list,
            head,
            std::mem::size_of::<RobustListHead>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The owning thread: registers the word, marks it alive, waits for the
/// stop signal (or the writer's channel closing), restores the previous
/// robust list and exits.
fn own(word: WordAddress, ready: &mpsc::Sender<io::Result<()>>, stop: &mpsc::Receiver<()>) {
    let mut previous: *mut RobustListHead = std::ptr::null_mut();
    let mut previous_len: libc::size_t = 0;
    // SAFETY: get_robust_list(0, ...) writes this thread's head pointer and
    // its size into the two locals.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut previous as *mut *mut RobustListHead,
            &mut previous_len as *mut libc::size_t,
        )
    };
    if rc != 0 {
        let _ = ready.send(Err(io::Error::last_os_error()));
        return;
    }
    let entry = Box::into_raw(Box::new(RobustList {
        next: std::ptr::null_mut(),
    }));
    let head = Box::into_raw(Box::new(RobustListHead {
        list: RobustList { next: entry },
        futex_offset: (word.0 as isize).wrapping_sub(entry as isize) as libc::c_long,
        list_op_pending: std::ptr::null_mut(),
    }));
    // SAFETY: both boxes were just leaked and are only freed below, after
    // the kernel stopped using them; the list is circular as the ABI wants.
    unsafe { (*entry).next = &mut (*head).list };
    if let Err(e) = set_robust_list(head) {
        // SAFETY: the kernel refused the head, so nothing else uses them.
        unsafe { drop((Box::from_raw(head), Box::from_raw(entry))) };
        let _ = ready.send(Err(e));
        return;
    }
    // SAFETY: gettid has no failure mode.
    let tid = unsafe { libc::gettid() } as u64;
    // SAFETY: `start`'s contract: the word is mapped and writable while the
    // owner exists, and the owner joins this thread before it goes away.
    let atomic = unsafe { AtomicU64::from_ptr(word.0 as *mut u64) };
    atomic.store(tid, Ordering::Release);
    let _ = ready.send(Ok(()));
    let _ = stop.recv();
    // Dropped: the owner already stored OWNER_DIED. Give the thread its C
    // library's list back before it exits, then free ours.
    if set_robust_list(previous).is_ok() {
        // SAFETY: the kernel no longer refers to our head and entry.
        unsafe { drop((Box::from_raw(head), Box::from_raw(entry))) };
    }
}
