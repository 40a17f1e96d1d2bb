//! I/O that a reader process started and that the kernel may still be
//! doing after the process is gone: how the writer tells that it has
//! drained, and how a reader arms that.
//!
//! A process's exit does not end its I/O. An `O_DIRECT` read submitted on
//! an io_uring goes on after the submitter died (the ring drains it in a
//! kernel worker) and writes into the pages it was given; a zero-copy send
//! still queued on a socket reads its pages when it is finally transmitted.
//! A dead reader's pins are therefore released only once everything it
//! registered here has drained:
//!
//! - **an io_uring** is tracked by a *sentinel*: the write end of a pipe
//!   that the reader installs in the ring's fixed-file table and closes,
//!   then hands the read end to the writer. The ring holds the only
//!   reference to the write end, and the kernel drops a ring's fixed files
//!   only when it frees the ring, which it does only once every request of
//!   the ring — and every zero-copy notification — has completed. The
//!   writer sees the pipe hang up exactly then.
//! - **a TCP socket** used for `MSG_ZEROCOPY` sends is tracked by its
//!   addresses and cookie: the writer asks the kernel (`sock_diag`) whether
//!   its send path still holds any packet, including after the socket was
//!   closed (an orphaned socket keeps its queue until it is acknowledged).

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use thiserror::Error;

use crate::memfd;
use crate::sock_diag::{self, SendPath, TcpEndpoints};
use crate::sockopt;

/// Most tracked rings and sockets per reader process.
pub const MAX_TRACKED: usize = 4096;

/// Why a ring or socket cannot be tracked.
#[derive(Debug, Error)]
pub enum TrackError {
    /// The descriptor is not what it should be.
    #[error("{0}")]
    Unsuitable(String),
    /// The reader already tracks [`MAX_TRACKED`] rings and sockets.
    #[error("already tracking {MAX_TRACKED} rings and sockets for this reader")]
    Full,
    /// A system call failed.
    #[error("{step}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl TrackError {
    /// The errno-style code the backend protocol reports for this error.
    pub fn code(&self) -> i32 {
        match self {
            TrackError::Unsuitable(_) => libc::EINVAL,
            TrackError::Full => libc::ENOSPC,
            TrackError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

fn io_err(step: &'static str) -> impl FnOnce(io::Error) -> TrackError {
    move |source| TrackError::Io { step, source }
}

/// Something of a reader whose in-flight I/O the writer waits for once the
/// reader is gone.
#[derive(Debug)]
pub enum TrackedIo {
    /// An io_uring, by its sentinel.
    Ring(RingSentinel),
    /// A TCP socket with zero-copy sends.
    Socket(TcpEndpoints),
}

impl TrackedIo {
    /// Whether nothing of it can touch guest memory any more. An error of
    /// the kernel query counts as "not drained" (never release early).
    pub fn drained(&self) -> bool {
        match self {
            TrackedIo::Ring(r) => r.drained(),
            TrackedIo::Socket(tcp) => match sock_diag::tcp_send_path(tcp) {
                Ok(path) => path.drained(),
                Err(e) => {
                    // The stall warnings name the backend as draining.
                    tracing::debug!(error = %e, ?tcp, "cannot ask the kernel about a zero-copy socket; assuming it still holds data");
                    false
                }
            },
        }
    }

    /// What it is, for logs.
    pub fn describe(&self) -> String {
        match self {
            TrackedIo::Ring(_) => "io_uring".into(),
            TrackedIo::Socket(t) => format!("zero-copy TCP socket {} -> {}", t.local, t.peer),
        }
    }
}

/// The read end of a ring's sentinel pipe, held by the writer.
#[derive(Debug)]
pub struct RingSentinel(OwnedFd);

impl RingSentinel {
    /// Takes the read end of a sentinel pipe: it must be the read end of a
    /// pipe whose write end is still open somewhere (in the ring).
    pub fn new(fd: OwnedFd) -> Result<Self, TrackError> {
        let st = fstat(&fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return Err(TrackError::Unsuitable(
                "a ring sentinel must be the read end of a pipe".into(),
            ));
        }
        // SAFETY: F_GETFL has no argument and no memory effects.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(TrackError::Unsuitable(
                "a ring sentinel must be the read end of its pipe".into(),
            ));
        }
        let sentinel = Self(fd);
        if sentinel.drained() {
            return Err(TrackError::Unsuitable(
                "the sentinel's write end is already closed: the ring does not hold it".into(),
            ));
        }
        Ok(sentinel)
    }

    /// Whether the ring is gone with all its requests (the pipe hung up).
    pub fn drained(&self) -> bool {
        use std::os::fd::AsFd;
        memfd::poll_now(self.0.as_fd(), libc::POLLIN) & libc::POLLHUP != 0
    }
}

fn fstat(fd: &OwnedFd) -> Result<libc::stat, TrackError> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat` for fstat to fill.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io_err("fstat")(io::Error::last_os_error()));
    }
    Ok(st)
}

/// `SO_COOKIE` of a socket.
pub fn socket_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    sockopt::get(sock, libc::SO_COOKIE, 0u64)
}

fn socket_address(sock: BorrowedFd<'_>, peer: bool) -> io::Result<Option<SocketAddr>> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    // SAFETY: the kernel writes at most `len` bytes into `ss`.
    let rc = unsafe {
        if peer {
            libc::getpeername(sock.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(sock.as_raw_fd(), p, &mut len)
        }
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTCONN) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { std::ptr::read(p.cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(a.sin_addr.s_addr).into(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { std::ptr::read(p.cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    })
}

/// Names a connected TCP socket for tracking, and checks that the writer's
/// kernel queries can see it (same network namespace).
pub fn tcp_endpoints(sock: BorrowedFd<'_>) -> Result<TcpEndpoints, TrackError> {
    let protocol = sockopt::get(sock, libc::SO_PROTOCOL, 0i32).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            TrackError::Unsuitable("not a socket".into())
        } else {
            io_err("SO_PROTOCOL")(e)
        }
    })?;
    if protocol != libc::IPPROTO_TCP {
        return Err(TrackError::Unsuitable(
            "only TCP sockets are tracked; send zero-copy on other sockets through a registered io_uring"
                .into(),
        ));
    }
    let local = socket_address(sock, false).map_err(io_err("getsockname"))?;
    let peer = socket_address(sock, true).map_err(io_err("getpeername"))?;
    let (Some(local), Some(peer)) = (local, peer) else {
        return Err(TrackError::Unsuitable(
            "the socket is not connected (register it once connected)".into(),
        ));
    };
    let cookie = socket_cookie(sock).map_err(io_err("SO_COOKIE"))?;
    let tcp = TcpEndpoints {
        local,
        peer,
        cookie,
    };
    match sock_diag::tcp_send_path(&tcp).map_err(io_err("sock_diag"))? {
        SendPath::Gone => Err(TrackError::Unsuitable(
            "the socket is not visible to the daemon's kernel queries (another network namespace?)"
                .into(),
        )),
        SendPath::Holding { .. } => Ok(tcp),
    }
}

// ------------------------------------------------------------ reader side

/// `io_uring_register(2)` opcodes used here (kernel ABI).
const IORING_REGISTER_FILES: libc::c_uint = 2;
const IORING_REGISTER_FILES_UPDATE: libc::c_uint = 6;

/// `struct io_uring_files_update`.
#[repr(C)]
struct FilesUpdate {
    offset: u32,
    resv: u32,
    fds: u64,
}

/// Where a ring's sentinel goes in the ring's fixed-file table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentinelSlot {
    /// The ring has no fixed-file table yet: register one of `entries`
    /// slots (at least 1), the sentinel in slot 0 and the others empty, for
    /// the backend to fill with `IORING_REGISTER_FILES_UPDATE`.
    NewTable {
        /// Slots of the new table.
        entries: u32,
    },
    /// The ring already has a table; put the sentinel in this (free) slot.
    Index(u32),
}

fn io_uring_register(
    ring: BorrowedFd<'_>,
    op: libc::c_uint,
    arg: *const libc::c_void,
    n: u32,
) -> io::Result<()> {
    // SAFETY: `arg` points at `n` entries of the type `op` expects, alive
    // for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            op,
            arg,
            n as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs a fresh sentinel in `ring`'s fixed-file table and returns the
/// read end to hand to the daemon. Call it before the ring is used for any
/// I/O into guest memory, from the thread that submits on it (rings set up
/// with `IORING_SETUP_SINGLE_ISSUER` accept registrations only from there).
/// Never replace or unregister the sentinel's slot afterwards: that ends
/// the tracking of the ring.
pub fn arm_ring_sentinel(ring: BorrowedFd<'_>, slot: SentinelSlot) -> io::Result<OwnedFd> {
    let mut ends = [-1i32; 2];
    // SAFETY: pipe2 writes two descriptors into `ends`.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    match slot {
        SentinelSlot::NewTable { entries } => {
            let mut fds = vec![-1i32; entries.max(1) as usize];
            fds[0] = write_end.as_raw_fd();
            io_uring_register(
                ring,
                IORING_REGISTER_FILES,
                fds.as_ptr().cast(),
                fds.len() as u32,
            )?;
        }
        SentinelSlot::Index(index) => {
            let fd = write_end.as_raw_fd();
            let update = FilesUpdate {
                offset: index,
                resv: 0,
                fds: (&fd as *const i32) as u64,
            };
            io_uring_register(
                ring,
                IORING_REGISTER_FILES_UPDATE,
                (&update as *const FilesUpdate).cast(),
                1,
            )?;
        }
    }
    // The ring holds the write end now; ours must not keep the pipe open.
    drop(write_end);
    Ok(read_end)
}
