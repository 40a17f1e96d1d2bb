//! Where a vhost-user backend listens for its VMM: a socket path it creates
//! (`--socket-path`), or an inherited listening socket (`--fd`).

use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::PathBuf;

use vhost::vhost_user::Listener;

/// Where to listen for the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Create and listen on this path.
    Path(PathBuf),
    /// Listen on this inherited descriptor.
    Fd(i32),
}

/// Why the VMM socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The socket could not be created or bound.
    #[error(transparent)]
    Socket(#[from] crate::socket_file::SocketFileError),
    /// The inherited descriptor is not a listening Unix socket.
    #[error("--fd {0} is not a listening socket")]
    NotListening(i32),
}

impl Listen {
    /// The listener. A path is bound only where no live process listens
    /// and nothing but a stale socket is ([`crate::socket_file`]); the file
    /// is removed at exit if it is still this process's.
    pub fn listener(&self) -> Result<Listener, ListenError> {
        match self {
            Listen::Path(p) => {
                let listener = crate::socket_file::bind(p, None)?;
                // SAFETY: the descriptor comes from a listener this function
                // owns and gives up here; nothing else refers to it.
                Ok(unsafe { Listener::from_raw_fd(listener.into_raw_fd()) })
            }
            Listen::Fd(fd) => {
                let mut accepting: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: getsockopt writes at most `len` bytes into
                // `accepting`, a live c_int; an invalid fd only makes it fail.
                let rc = unsafe {
                    libc::getsockopt(
                        *fd,
                        libc::SOL_SOCKET,
                        libc::SO_ACCEPTCONN,
                        (&mut accepting as *mut libc::c_int).cast(),
                        &mut len,
                    )
                };
                if rc != 0 || accepting == 0 {
                    return Err(ListenError::NotListening(*fd));
                }
                // SAFETY: the descriptor was handed to this process for this
                // use (a listening socket, checked above) and nothing else in
                // the process owns it.
                Ok(unsafe { Listener::from_raw_fd(*fd) })
            }
        }
    }

    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Listen::Path(p) => p.display().to_string(),
            Listen::Fd(fd) => format!("inherited fd {fd}"),
        }
    }

    /// The socket file to remove at exit, if this process created one.
    pub fn path(&self) -> Option<&PathBuf> {
        match self {
            Listen::Path(p) => Some(p),
            Listen::Fd(_) => None,
        }
    }
}
