//! Aggregate throughput of several workers running at once, as threads of
//! this process or as forked processes.
//!
//! Workers set themselves up, then call [`Gate::run`]: all of them start on
//! the same signal, each counts the operations it completes until the stop
//! signal and times itself; the aggregate rate is the sum of the workers'
//! own rates. The signals and results live in an anonymous `MAP_SHARED` page so the
//! same code serves threads and forked children.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::shm_rig::SetupError;

const READY: usize = 0;
const GO: usize = 64;
const STOP: usize = 128;
const RESULTS: usize = 256;
/// Most workers one run supports.
pub const MAX_WORKERS: usize = 48;

/// The start/stop signals and the result words of one run: an anonymous
/// `MAP_SHARED` page, which forked children share with the parent (a
/// `memfd::SharedMapping` would not do: it is `MADV_DONTFORK`).
#[derive(Debug)]
pub struct Board {
    base: std::ptr::NonNull<u8>,
}

const BOARD_BYTES: usize = 4096;

impl Board {
    fn new() -> Result<Self, SetupError> {
        // SAFETY: a fresh anonymous mapping chosen by the kernel cannot
        // alias any Rust object; failure is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BOARD_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let base = std::ptr::NonNull::new(p.cast::<u8>()).ok_or("mmap returned null")?;
        Ok(Self { base })
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset < BOARD_BYTES);
        // SAFETY: in bounds and aligned (checked; the base is page-aligned);
        // the page stays mapped while `self` lives and is only accessed
        // atomically, by this process and its forked children.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast::<u64>()) }
    }

    fn gate(&self, index: usize) -> Gate<'_> {
        Gate { board: self, index }
    }

    /// Waits for `n` workers to be ready (or for `alive` to say one died),
    /// runs them for `run_for`, then stops them.
    fn start_and_stop(&self, n: u64, run_for: Duration, mut alive: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.word(READY).load(Ordering::Acquire) < n {
            if !alive() || Instant::now() > deadline {
                self.word(STOP).store(1, Ordering::Release);
                self.word(GO).store(1, Ordering::Release);
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.word(GO).store(1, Ordering::Release);
        std::thread::sleep(run_for);
        self.word(STOP).store(1, Ordering::Release);
        true
    }

    fn aggregate(&self, n: usize) -> f64 {
        (0..n)
            .map(|i| {
                let ops = self.word(RESULTS + 64 * i).load(Ordering::Acquire);
                let nanos = self.word(RESULTS + 64 * i + 8).load(Ordering::Acquire);
                if nanos == 0 {
                    0.0
                } else {
                    ops as f64 * 1e9 / nanos as f64
                }
            })
            .sum()
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no reference into it outlives
        // `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), BOARD_BYTES) };
    }
}

// SAFETY: the page is only accessed through atomics; the pointer is valid
// until `Drop`, whichever thread runs it.
unsafe impl Sync for Board {}
// SAFETY: as above.
unsafe impl Send for Board {}

/// A worker's view of the run.
#[derive(Debug)]
pub struct Gate<'a> {
    board: &'a Board,
    index: usize,
}

impl Gate<'_> {
    /// This worker's index (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Reports ready, waits for the start signal, then calls `step` until
    /// the stop signal; `step` returns how many operations it did. Records
    /// the count and the time taken.
    pub fn run(&self, mut step: impl FnMut() -> u64) {
        let b = self.board;
        b.word(READY).fetch_add(1, Ordering::AcqRel);
        while b.word(GO).load(Ordering::Acquire) == 0 {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        let mut ops = 0u64;
        while b.word(STOP).load(Ordering::Relaxed) == 0 {
            ops += step();
        }
        let nanos = start.elapsed().as_nanos() as u64;
        b.word(RESULTS + 64 * self.index)
            .store(ops, Ordering::Relaxed);
        b.word(RESULTS + 64 * self.index + 8)
            .store(nanos.max(1), Ordering::Release);
    }
}

/// Runs `n` workers as threads of this process for `run_for`; returns the
/// aggregate operations per second.
pub fn threads<F>(n: usize, run_for: Duration, body: F) -> Result<f64, SetupError>
where
    F: Fn(&Gate<'_>) + Sync,
{
    assert!(n <= MAX_WORKERS);
    let board = Board::new()?;
    let ok = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (board, body) = (&board, &body);
                s.spawn(move || body(&board.gate(i)))
            })
            .collect();
        let ok = board.start_and_stop(n as u64, run_for, || {
            handles.iter().all(|h| !h.is_finished())
        });
        let joined = handles.into_iter().all(|h| h.join().is_ok());
        ok && joined
    });
    if !ok {
        return Err("a worker thread failed".into());
    }
    Ok(board.aggregate(n))
}

/// Runs `n` workers as forked child processes for `run_for`; returns the
/// aggregate operations per second. `spawned(i, pid)` runs in the parent
/// after child `i` is forked (to register it with the writer, say). Call it
/// only while this process has a single thread: the child runs `body` and
/// exits without returning.
pub fn processes<F, S>(
    n: usize,
    run_for: Duration,
    body: F,
    mut spawned: S,
) -> Result<f64, SetupError>
where
    F: Fn(&Gate<'_>),
    S: FnMut(usize, i32) -> Result<(), SetupError>,
{
    assert!(n <= MAX_WORKERS);
    let board = Board::new()?;
    let mut pids = Vec::with_capacity(n);
    let mut setup: Result<(), SetupError> = Ok(());
    for i in 0..n {
        // SAFETY: the caller guarantees this process has one thread, so the
        // child's copy of the heap and locks is consistent; the child leaves
        // only through `_exit`, never returning into the parent's code.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = catch_unwind(AssertUnwindSafe(|| body(&board.gate(i)))).is_ok();
            // SAFETY: ends the child at once, without running the parent's
            // destructors or atexit handlers a second time.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        if pid < 0 {
            setup = Err(std::io::Error::last_os_error().into());
            break;
        }
        pids.push(pid);
        if let Err(e) = spawned(i, pid) {
            setup = Err(e);
            break;
        }
    }
    let started = setup.is_ok()
        && board.start_and_stop(n as u64, run_for, || {
            pids.iter().all(|&p| {
                let mut status = 0;
                // SAFETY: polls our own child without blocking.
                unsafe { libc::waitpid(p, &mut status, libc::WNOHANG) == 0 }
            })
        });
    if !started {
        board.word(STOP).store(1, Ordering::Release);
        board.word(GO).store(1, Ordering::Release);
    }
    let mut all_ok = true;
    for p in pids {
        let mut status = 0;
        // SAFETY: reaps our own child; blocks until it has exited (it stops
        // on the STOP word set above).
        let r = unsafe { libc::waitpid(p, &mut status, 0) };
        all_ok &= r == p && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    }
    setup?;
    if !started || !all_ok {
        return Err("a worker process failed".into());
    }
    Ok(board.aggregate(n))
}
