//! The socket options the writer reads: who is at the other end of a
//! backend's connection, and what names a TCP socket.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Reads the `SOL_SOCKET` option `name`, a `T`, starting from `value`.
pub(crate) fn get<T: Copy>(sock: BorrowedFd<'_>, name: i32, mut value: T) -> io::Result<T> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a live,
    // plain `T` (an integer or a C struct of integers).
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The process and user at the other end of a Unix socket, as they were
/// when it connected (`SO_PEERCRED`).
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    get(
        sock,
        libc::SO_PEERCRED,
        libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        },
    )
}
