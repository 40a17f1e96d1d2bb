//! Where a vhost-user backend listens for its VMM: a socket path it creates
//! (`--socket-path`), or an inherited listening socket (`--fd`, which is
//! also how a systemd socket unit's socket arrives: [`crate::activation`]).

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
    /// and nothing but a stale socket is ([`crate::socket_file`]), with the
    /// mode and group of `perms` (an inherited descriptor keeps its own);
    /// the file is removed at exit if it is still this process's.
    pub fn listener(
        &self,
        perms: crate::socket_file::Permissions,
    ) -> Result<Listener, ListenError> {
        match self {
            Listen::Path(p) => {
                let listener = crate::socket_file::bind(p, perms)?;
                // SAFETY: the descriptor comes from a listener this function
                // owns and gives up here; nothing else refers to it.
                Ok(unsafe { Listener::from_raw_fd(listener.into_raw_fd()) })
            }
            Listen::Fd(fd) => {
                if !crate::activation::is_listening(*fd) {
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

/// Watches a listening socket while one VMM is served: a second VMM that
/// connects meanwhile waits in the backlog (one VMM per device), and is
/// told so in the log once per wait instead of waiting silently. Stops
/// when dropped.
pub struct WaitingVmmWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WaitingVmmWatch {
    /// Starts watching `listener` (which must outlive the watch).
    pub fn start(listener: &impl std::os::fd::AsRawFd, socket: String) -> WaitingVmmWatch {
        use std::sync::atomic::Ordering;
        let fd = listener.as_raw_fd();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-backlog".into())
            .spawn(move || {
                let mut told = false;
                while !flag.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; the listener outlives the
                    // watch (its owner drops the watch first).
                    let n = unsafe { libc::poll(&mut p, 1, 200) };
                    let waiting = n > 0 && p.revents & libc::POLLIN != 0;
                    if waiting && !told {
                        tracing::warn!(
                            socket = %socket,
                            "another VMM is connecting while one is served: it waits until \
                             the current VMM disconnects (one VMM per device)"
                        );
                    }
                    told = waiting;
                    if waiting {
                        // Level-triggered: do not spin while it waits.
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                }
            })
            .ok();
        WaitingVmmWatch { stop, thread }
    }
}

impl Drop for WaitingVmmWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
