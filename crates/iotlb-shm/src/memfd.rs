//! Memfds and their shared mappings: the only place that calls `mmap`, and
//! the only way to reach a shared word (as an atomic, never as a plain
//! reference to memory another process writes).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::sync::AtomicU64;

/// Seals that freeze a file's size and forbid new writable mappings; the
/// creator's own writable mapping (made before sealing) keeps working.
pub const SEALS_FROZEN_READ_ONLY: i32 =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
/// Seals for a file that only its creator may grow (the arena).
pub const SEALS_GROWABLE_READ_ONLY: i32 =
    libc::F_SEAL_SHRINK | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
/// Seals for a file both sides map writable but nobody may resize (slots).
pub const SEALS_FIXED_SIZE: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Creates a memfd that can be sealed, of `len` bytes.
pub fn create(name: &CStr, len: u64) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    resize(fd.as_fd_borrowed(), len)?;
    Ok(fd)
}

/// Sets the size of a file.
pub fn resize(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: ftruncate on a valid descriptor has no memory effects.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Adds `seals` to a memfd.
pub fn seal(fd: BorrowedFd<'_>, seals: i32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument and has no memory effects.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals a file carries.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: F_GET_SEALS has no argument and no memory effects.
    let s = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

/// Size of a file in bytes.
pub fn size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat` for fstat to fill.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(st.st_size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Borrow helper so callers do not need the `AsFd` import.
trait AsFdBorrowed {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
}

impl AsFdBorrowed for OwnedFd {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.as_fd()
    }
}

/// A `MAP_SHARED` mapping of (part of) a file. It may extend past the
/// file's end (the arena is mapped at its maximum size once); touching such
/// pages before the file grows raises SIGBUS, so callers only follow indices
/// the writer has published.
///
/// Every mapping is marked `MADV_DONTFORK`: a child forked by a process
/// that holds the table (a backend daemonizing, a prefork pool) does not
/// inherit it, so it can never translate through a slot file whose owner
/// the writer no longer watches. A child that needs the table connects on
/// its own.
#[derive(Debug)]
pub struct SharedMapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that is only ever accessed
// through atomics; the pointer stays valid until `Drop`, whichever thread
// runs it.
unsafe impl Send for SharedMapping {}
// SAFETY: as above: all access goes through `&AtomicU64`, which is Sync.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` from offset 0, writable or read-only.
    pub fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Self> {
        if len == 0 || len % 4096 != 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr = null) cannot
        // alias any Rust object; failure is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        let mapping = Self { base, len };
        // SAFETY: advice on a range this value just mapped and owns; it
        // changes what fork() copies, nothing about the pages themselves.
        if unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) } != 0 {
            return Err(io::Error::last_os_error()); // `mapping` unmaps it
        }
        Ok(mapping)
    }

    /// Mapped length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `map` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 8-byte aligned word at `offset`, as an atomic.
    ///
    /// # Panics
    /// If `offset` is misaligned or the word lies outside the mapping: a bug
    /// of the caller, which validates every offset derived from shared data.
    #[inline]
    pub fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset % 8 == 0 && offset < self.len,
            "word {offset:#x} outside mapping"
        );
        // SAFETY: in bounds and 8-aligned (checked above; the base is
        // page-aligned); the memory stays mapped for `&self`'s lifetime and is
        // only ever accessed atomically, by every process that maps it.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast::<u64>()) }
    }

    /// The word at `offset`, without the bounds check of [`Self::word`],
    /// for the reader's walk, which bounds every index once up front.
    ///
    /// # Safety
    /// `offset` must be a multiple of 8 below [`Self::len`].
    #[inline(always)]
    pub unsafe fn word_unchecked(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset < self.len);
        // SAFETY: the caller guarantees an aligned offset inside the
        // mapping, which lives as long as `&self` and is only ever accessed
        // atomically.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast::<u64>()) }
    }

    /// Base address (for tests that probe page protections).
    pub fn as_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe a mapping this value owns; no
        // reference into it outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Opens a pidfd for `pid` (Linux ≥ 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes (pid, flags) and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The events pending on `fd` among `events` (plus POLLHUP/POLLERR), without
/// waiting.
pub fn poll_now(fd: BorrowedFd<'_>, events: i16) -> i16 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n > 0 { p.revents } else { 0 }
}

/// Whether the process behind `pidfd` has exited (the pidfd is readable).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    poll_now(pidfd, libc::POLLIN) & (libc::POLLIN | libc::POLLHUP) != 0
}

/// Whether every holder of the other end of a stream socket has closed it
/// (or shut it down both ways): the peer can no longer send on it.
pub fn peer_hung_up(sock: BorrowedFd<'_>) -> bool {
    poll_now(sock, libc::POLLIN) & libc::POLLHUP != 0
}

/// Sends SIGKILL through a pidfd (no PID-reuse race).
pub fn pidfd_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: (pidfd, sig, info = NULL, flags = 0) is a valid call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
