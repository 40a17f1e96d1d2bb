//! The writer's list of reader processes: each one's slot file (mapped
//! read-only), a pidfd that says when the process is gone, its connection
//! to the daemon, and the I/O it registered.
//!
//! A reader is **released** — its slots and pins stop counting — only when
//! nothing it started can still touch guest memory:
//!
//! - it closed its slot file (the reader library does so when its last
//!   slot and pin handle is dropped, then unmaps the file), or
//! - its process has exited, **and** its connection is closed everywhere
//!   (a child that inherited the socket keeps it open), **and** every
//!   io_uring and zero-copy socket it registered has drained
//!   ([`crate::drain`]).
//!
//! Nothing else releases a reader: not a timeout, not a kill that was only
//! attempted, not a malformed message.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};

use thiserror::Error;

use crate::drain::{MAX_TRACKED, TrackError, TrackedIo};
use crate::memfd;
use crate::slots::{SlotError, SlotMap};

/// Identifies a registered reader process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReaderId(pub u64);

/// Failure to register a reader.
#[derive(Debug, Error)]
pub enum RegisterError {
    /// The slot file is unusable.
    #[error("reader {pid}: slot file")]
    Slots {
        /// The reader's PID.
        pid: i32,
        /// Why.
        #[source]
        source: SlotError,
    },
    /// The process cannot be watched (already gone, or no pidfd support).
    #[error("reader {pid}: pidfd")]
    Pidfd {
        /// The reader's PID.
        pid: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// How the writer watches a reader process.
#[derive(Debug)]
pub struct ReaderProcess {
    /// Its PID (for logs).
    pub pid: i32,
    /// A pidfd of the process.
    pub pidfd: OwnedFd,
    /// The daemon's end of the process's connection, if it has one: the
    /// reader is not released while the other end is open anywhere.
    pub connection: Option<OwnedFd>,
}

impl ReaderProcess {
    /// Watches process `pid`, which has no connection (in-process readers,
    /// tests, readers handed their files some other way).
    pub fn watch(pid: i32) -> Result<Self, RegisterError> {
        let pidfd =
            memfd::pidfd_open(pid).map_err(|source| RegisterError::Pidfd { pid, source })?;
        Ok(Self {
            pid,
            pidfd,
            connection: None,
        })
    }

    /// Watches the process at the other end of the Unix socket `sock`: its
    /// pidfd comes from `SO_PEERPIDFD` (Linux ≥ 6.5), which names the very
    /// process that connected; on older kernels from the `SO_PEERCRED` PID,
    /// opened at once (a PID reused between the connection and this call
    /// would be watched instead, so call this right after `accept`).
    pub fn of_peer(sock: BorrowedFd<'_>) -> Result<Self, RegisterError> {
        let pid = crate::sockopt::peer_credentials(sock)
            .map_err(|source| RegisterError::Pidfd { pid: 0, source })?
            .pid;
        let pidfd = match peer_pidfd(sock) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                memfd::pidfd_open(pid).map_err(|source| RegisterError::Pidfd { pid, source })?
            }
            Err(source) => return Err(RegisterError::Pidfd { pid, source }),
        };
        let connection = sock
            .try_clone_to_owned()
            .map_err(|source| RegisterError::Pidfd { pid, source })?;
        Ok(Self {
            pid,
            pidfd,
            connection: Some(connection),
        })
    }
}

fn peer_pidfd(sock: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let fd = crate::sockopt::get(sock, libc::SO_PEERPIDFD, -1i32)?;
    // SAFETY: the kernel installed a fresh descriptor for us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD with FD_CLOEXEC on our own descriptor.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(fd)
}

/// Why a reader could be released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The process closed its slot file: it holds no session and no pin.
    SlotsClosed,
    /// The process exited, its connection is closed, its I/O drained.
    ExitedAndDrained,
    /// A slot file of a previous writer, handed over: the process retired
    /// it and no session or pin is left in it.
    PreviousFinished,
}

/// Where a reader stands, as far as the writer can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderState {
    /// The process lives (and its connection, if any, is open).
    Active,
    /// Its connection is closed but the process lives and has not closed
    /// its slot file: its sessions and pins keep counting until it exits.
    Lingering,
    /// The process exited but its connection is still open in another
    /// process (a child it forked): that process may hold translations.
    ConnectionHeld,
    /// The process exited and its connection is closed; `pending` of the
    /// rings and sockets it registered still have I/O in flight.
    Draining {
        /// Rings and sockets not drained yet.
        pending: usize,
    },
    /// Nothing it started can touch guest memory any more.
    Released(ReleaseReason),
}

impl ReaderState {
    /// A phrase for logs.
    pub fn describe(self) -> &'static str {
        match self {
            ReaderState::Active => "alive",
            ReaderState::Lingering => {
                "closed its connection but still maps its slot file; counted until it exits"
            }
            ReaderState::ConnectionHeld => {
                "exited, but another process (a forked child?) still holds its connection"
            }
            ReaderState::Draining { .. } => "exited; waiting for the I/O it registered to drain",
            ReaderState::Released(ReleaseReason::SlotsClosed) => "closed its slot file",
            ReaderState::Released(ReleaseReason::ExitedAndDrained) => {
                "exited with its connection closed and its I/O drained"
            }
            ReaderState::Released(ReleaseReason::PreviousFinished) => {
                "finished with the previous daemon's table"
            }
        }
    }
}

/// What the stall policy did to a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum KillState {
    /// Nothing.
    #[default]
    None = 0,
    /// SIGKILL was delivered; the reader is released once it is gone and
    /// its I/O drained, like any other.
    Sent = 1,
    /// The kill was refused (no permission); the reader is waited for.
    Failed = 2,
}

/// One registered reader process.
#[derive(Debug)]
pub struct Reader {
    /// Its ID.
    pub id: ReaderId,
    /// Its PID.
    pub pid: i32,
    /// `None`: the process was already gone when it was registered.
    pidfd: Option<OwnedFd>,
    connection: Option<OwnedFd>,
    /// Its slot file, read-only.
    pub slots: SlotMap,
    io: Vec<TrackedIo>,
    /// A [`KillState`], as its discriminant (a `&Reader` records the kill).
    kill: AtomicU8,
    /// The slot file is one a previous writer gave the process
    /// ([`Registry::register_previous`]).
    previous: bool,
    /// For a previous slot file: the registration of the same process with
    /// this writer, which tracks its I/O.
    current: Option<ReaderId>,
}

impl Reader {
    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        self.pidfd
            .as_ref()
            .is_none_or(|p| memfd::pidfd_exited(p.as_fd()))
    }

    /// Where the reader stands (a few non-blocking system calls; one kernel
    /// query per registered socket once the process is gone).
    pub fn state(&self) -> ReaderState {
        if self.slots.closed() {
            return ReaderState::Released(ReleaseReason::SlotsClosed);
        }
        if self.previous && self.slots.retired() && self.slots.idle() {
            return ReaderState::Released(ReleaseReason::PreviousFinished);
        }
        let exited = self.exited();
        let connection_closed = self
            .connection
            .as_ref()
            .is_none_or(|c| memfd::peer_hung_up(c.as_fd()));
        match (exited, connection_closed) {
            (false, false) => ReaderState::Active,
            (false, true) if self.connection.is_some() => ReaderState::Lingering,
            (false, true) => ReaderState::Active,
            (true, false) => ReaderState::ConnectionHeld,
            (true, true) => match self.io.iter().filter(|io| !io.drained()).count() {
                0 => ReaderState::Released(ReleaseReason::ExitedAndDrained),
                pending => ReaderState::Draining { pending },
            },
        }
    }

    /// Whether its slot file came from a previous writer.
    pub fn previous(&self) -> bool {
        self.previous
    }

    /// Rings and sockets it registered.
    pub fn tracked(&self) -> &[TrackedIo] {
        &self.io
    }

    /// What the stall policy did to it.
    pub fn kill_state(&self) -> KillState {
        match self.kill.load(Ordering::Relaxed) {
            1 => KillState::Sent,
            2 => KillState::Failed,
            _ => KillState::None,
        }
    }

    /// Sends the process SIGKILL through its pidfd (no PID-reuse race).
    /// Only a delivered signal counts; the process is still waited for.
    pub fn kill(&self) -> std::io::Result<()> {
        let result = match &self.pidfd {
            Some(p) => memfd::pidfd_kill(p.as_fd()),
            None => Err(std::io::Error::from_raw_os_error(libc::ESRCH)),
        };
        let state = if result.is_ok() {
            KillState::Sent
        } else {
            KillState::Failed
        };
        self.kill.store(state as u8, Ordering::Relaxed);
        result
    }
}

/// A reader that was just released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Its ID.
    pub id: ReaderId,
    /// Its PID.
    pub pid: i32,
    /// Why.
    pub reason: ReleaseReason,
}

/// All registered readers.
#[derive(Debug, Default)]
pub struct Registry {
    readers: Vec<Reader>,
    next_id: u64,
}

impl Registry {
    /// Numbers the readers registered from now on from `first` (a daemon
    /// starts from a value of its own, so that reader IDs name one
    /// connection across daemon restarts).
    pub fn number_from(&mut self, first: u64) {
        self.next_id = self.next_id.max(first);
    }

    /// Registers `process` with the slot file `slots_fd`.
    pub fn register(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        process: ReaderProcess,
    ) -> Result<ReaderId, RegisterError> {
        self.push(
            slots_fd,
            process.pid,
            Some(process.pidfd),
            process.connection,
            None,
        )
    }

    /// Adds a reader; `previous`: the registration that tracks the I/O of
    /// the process of a previous writer's slot file
    /// ([`Self::register_previous`]).
    fn push(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        pid: i32,
        pidfd: Option<OwnedFd>,
        connection: Option<OwnedFd>,
        previous: Option<Option<ReaderId>>,
    ) -> Result<ReaderId, RegisterError> {
        let slots = SlotMap::open(slots_fd, false)
            .map_err(|source| RegisterError::Slots { pid, source })?;
        let id = ReaderId(self.next_id);
        self.next_id += 1;
        self.readers.push(Reader {
            id,
            pid,
            pidfd,
            connection,
            slots,
            io: Vec::new(),
            kill: AtomicU8::new(KillState::None as u8),
            previous: previous.is_some(),
            current: previous.flatten(),
        });
        Ok(id)
    }

    /// Registers the slot file `slots_fd` that a previous writer (a daemon
    /// that died or was restarted) gave `process`, which hands it over
    /// after retiring it: nothing new starts in it, and the reader is
    /// released once the sessions and pins left in it are over. Should the
    /// process exit first, it is released only with the process's current
    /// registration, which tracks its I/O.
    pub fn register_previous(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        process: ReaderProcess,
        current: Option<ReaderId>,
    ) -> Result<ReaderId, RegisterError> {
        self.push(
            slots_fd,
            process.pid,
            Some(process.pidfd),
            process.connection,
            Some(current),
        )
    }

    /// Previous slot files registered for process `pid`.
    pub fn previous_of(&self, pid: i32) -> usize {
        self.readers
            .iter()
            .filter(|r| r.previous && r.pid == pid)
            .count()
    }

    /// Registers the slot file `slots_fd` of a previous writer whose
    /// process `pid` is already gone (its pidfd was not kept): it is
    /// released once the file is closed or retired and idle, or once the
    /// I/O registered with [`Self::track`] has drained.
    pub fn register_previous_of_gone(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        pid: i32,
    ) -> Result<ReaderId, RegisterError> {
        self.push(slots_fd, pid, None, None, Some(None))
    }

    /// The state of the reader at position `i` (< [`Self::len`]): its
    /// [`Reader::state`], with the rule of [`Self::register_previous`] for
    /// a previous slot file whose process exited.
    pub fn state_of(&self, i: usize) -> ReaderState {
        let r = &self.readers[i];
        let state = r.state();
        if r.previous
            && state == ReaderState::Released(ReleaseReason::ExitedAndDrained)
            && r.current
                .is_some_and(|c| self.readers.iter().any(|o| o.id == c))
        {
            return ReaderState::Draining { pending: 0 };
        }
        state
    }

    /// Tracks a ring or socket of reader `id` (see [`crate::drain`]).
    /// Rings and sockets already drained are forgotten first.
    pub fn track(&mut self, id: ReaderId, io: TrackedIo) -> Result<(), TrackError> {
        let reader = self
            .readers
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| TrackError::Unsuitable("the reader is not registered".into()))?;
        if reader.io.len() >= MAX_TRACKED {
            reader.io.retain(|io| !io.drained());
        }
        if reader.io.len() >= MAX_TRACKED {
            return Err(TrackError::Full);
        }
        reader.io.push(io);
        Ok(())
    }

    /// Forgets a reader unconditionally. Only for a reader that never
    /// received its slot file (registration failed half-way): any other is
    /// released by [`Self::release_finished`] or [`Self::try_release`].
    pub fn remove(&mut self, id: ReaderId) -> bool {
        let before = self.readers.len();
        self.readers.retain(|r| r.id != id);
        before != self.readers.len()
    }

    /// Releases every reader that nothing can hold any more.
    pub fn release_finished(&mut self) -> Vec<Released> {
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.readers.len() {
            match self.state_of(i) {
                ReaderState::Released(reason) => {
                    let r = self.readers.remove(i);
                    gone.push(Released {
                        id: r.id,
                        pid: r.pid,
                        reason,
                    });
                }
                _ => i += 1,
            }
        }
        gone
    }

    /// Releases reader `id` if nothing can hold it any more. `None` if it
    /// is not registered (already released); otherwise its state, which is
    /// `Released` when it was removed by this call.
    pub fn try_release(&mut self, id: ReaderId) -> Option<ReaderState> {
        let i = self.readers.iter().position(|r| r.id == id)?;
        let state = self.state_of(i);
        if matches!(state, ReaderState::Released(_)) {
            self.readers.remove(i);
        }
        Some(state)
    }

    /// The registered readers.
    pub fn readers(&self) -> &[Reader] {
        &self.readers
    }

    /// Reader at position `i`.
    pub fn get(&self, i: usize) -> Option<&Reader> {
        self.readers.get(i)
    }

    /// Position of reader `id`.
    pub fn position(&self, id: ReaderId) -> Option<usize> {
        self.readers.iter().position(|r| r.id == id)
    }

    /// Number of registered readers.
    pub fn len(&self) -> usize {
        self.readers.len()
    }

    /// Whether no reader is registered.
    pub fn is_empty(&self) -> bool {
        self.readers.is_empty()
    }
}
