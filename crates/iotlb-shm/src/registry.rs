//! The writer's list of reader processes: each one's slot file (mapped
//! read-only) and a pidfd that says when the process is gone.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use thiserror::Error;

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
    #[error("reader {pid}: pidfd_open")]
    Pidfd {
        /// The reader's PID.
        pid: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One registered reader process.
#[derive(Debug)]
pub struct Reader {
    /// Its ID.
    pub id: ReaderId,
    /// Its PID.
    pub pid: i32,
    pidfd: OwnedFd,
    /// Its slot file, read-only.
    pub slots: SlotMap,
}

impl Reader {
    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        memfd::pidfd_exited(self.pidfd.as_fd())
    }

    /// Kills the process (used by the stall policy) and waits up to one
    /// second for it to be gone.
    pub fn kill(&self) -> std::io::Result<()> {
        memfd::pidfd_kill(self.pidfd.as_fd())?;
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.pidfd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the timeout bounds the wait.
        unsafe { libc::poll(&mut p, 1, 1000) };
        Ok(())
    }
}

/// All registered readers.
#[derive(Debug, Default)]
pub struct Registry {
    readers: Vec<Reader>,
    next_id: u64,
}

impl Registry {
    /// Registers the process `pid` with the slot file `slots_fd`.
    pub fn register(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        pid: i32,
    ) -> Result<ReaderId, RegisterError> {
        let slots = SlotMap::open(slots_fd, false)
            .map_err(|source| RegisterError::Slots { pid, source })?;
        let pidfd =
            memfd::pidfd_open(pid).map_err(|source| RegisterError::Pidfd { pid, source })?;
        let id = ReaderId(self.next_id);
        self.next_id += 1;
        self.readers.push(Reader {
            id,
            pid,
            pidfd,
            slots,
        });
        Ok(id)
    }

    /// Forgets a reader; its slots and pins stop counting. Returns whether
    /// it was registered.
    pub fn remove(&mut self, id: ReaderId) -> bool {
        let before = self.readers.len();
        self.readers.retain(|r| r.id != id);
        before != self.readers.len()
    }

    /// Removes every reader whose process has exited; returns their IDs.
    pub fn reap(&mut self) -> Vec<ReaderId> {
        let mut gone = Vec::new();
        self.readers.retain(|r| {
            let dead = r.exited();
            if dead {
                gone.push(r.id);
            }
            !dead
        });
        gone
    }

    /// The registered readers.
    pub fn readers(&self) -> &[Reader] {
        &self.readers
    }

    /// Reader at position `i`.
    pub fn get(&self, i: usize) -> Option<&Reader> {
        self.readers.get(i)
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
