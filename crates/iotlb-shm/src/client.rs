//! The backend's side of the backend socket: connect to the daemon, get
//! the table and a slot file, register the rings and sockets that do I/O
//! into guest memory, report faults.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;

use crate::access::Fault;
use crate::backend_proto::{self, MAX_LEN, Message, WELCOME_FDS};
use crate::drain::{self, SentinelSlot};
use crate::reader::{OpenError, TableReader};
use crate::slots::{SlotError, SlotFile};

/// Failure to connect to the daemon or to talk to it.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("backend socket: {step}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The daemon refused this process.
    #[error("the daemon refused this backend: {reason} (code {code})")]
    Refused {
        /// errno-style code.
        code: u32,
        /// The daemon's reason.
        reason: String,
    },
    /// The daemon answered something unexpected.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    /// The daemon refused a registration; the connection goes on.
    #[error("the daemon refused the registration: {reason} (code {code})")]
    NotRegistered {
        /// errno-style code.
        code: u32,
        /// The daemon's reason.
        reason: String,
    },
    /// The table it sent does not open.
    #[error("opening the daemon's table")]
    Table(#[from] OpenError),
    /// The slot file it sent does not open.
    #[error("opening the daemon's slot file")]
    Slots(#[from] SlotError),
}

/// A backend connected to the daemon: its view of the table and its slots.
///
/// Dropping it closes the connection. The daemon forgets the process once
/// its slot file is closed too (when the last [`crate::ReaderSlot`] and
/// [`crate::Pin`] are dropped), or once the process has exited and the I/O
/// it registered has drained. A child forked after `connect` does not
/// inherit the table (the mappings are `MADV_DONTFORK`); it connects on its
/// own.
///
/// When the daemon dies, every session faults with
/// [`crate::FaultKind::Detached`] (see [`Self::daemon_alive`]), unless the
/// table survives it: connect again once it is back, and hand the previous
/// slot file over ([`Self::hand_over`]).
#[derive(Debug)]
pub struct BackendClient {
    sock: UnixStream,
    /// Serialises registrations (each waits for its answer).
    answers: Mutex<()>,
    next_cookie: AtomicU64,
    /// The table, read-only.
    pub table: TableReader,
    /// This process's slot file.
    pub slots: Arc<SlotFile>,
    /// The daemon's ID for this reader.
    pub reader_id: u64,
}

/// One piece of a [`BackendClient::lookup`]: where `iova` (for the piece's
/// length) goes, or the fault that stops the translation there.
pub type LookedUp = Result<(u64, crate::Piece), crate::Fault>;

impl BackendClient {
    /// Connects to the daemon's backend socket and asks for `slots` session
    /// slots and `pins` pin records (0 = the daemon's defaults). A client
    /// that replaces one connected to a previous daemon says so with
    /// [`Self::hand_over`] (until it has, that daemon's successor completes
    /// no revocation).
    pub fn connect(path: &Path, slots: u32, pins: u32) -> Result<Self, ClientError> {
        let io = |step| move |source| ClientError::Io { step, source };
        let sock = UnixStream::connect(path).map_err(io("connect"))?;
        let sent = backend_proto::send_with_fds(
            sock.as_fd(),
            &Message::Hello { slots, pins }.encode(),
            &[],
        );
        let mut buf = [0u8; MAX_LEN];
        if let Err(e) = sent {
            // The daemon may have refused and closed before reading HELLO:
            // its reason is then still waiting in the socket.
            if let Ok(Some((Message::Refused { code, reason }, _))) =
                backend_proto::recv_message(sock.as_fd(), &mut buf)
            {
                return Err(ClientError::Refused { code, reason });
            }
            return Err(io("send hello")(e));
        }
        let (msg, fds) = backend_proto::recv_message(sock.as_fd(), &mut buf)
            .map_err(io("receive welcome"))?
            .ok_or_else(|| ClientError::Protocol("the daemon closed the connection".into()))?;
        let reader_id = match msg {
            Message::Welcome { reader_id } => reader_id,
            Message::Refused { code, reason } => return Err(ClientError::Refused { code, reason }),
            other => return Err(ClientError::Protocol(format!("{other:?}"))),
        };
        if fds.len() != WELCOME_FDS {
            return Err(ClientError::Protocol(format!(
                "{} descriptors instead of {WELCOME_FDS}",
                fds.len()
            )));
        }
        let table = TableReader::open(fds[0].as_fd(), fds[1].as_fd())?;
        let slots = SlotFile::open(fds[2].as_fd())?;
        Ok(Self {
            sock,
            answers: Mutex::new(()),
            next_cookie: AtomicU64::new(1),
            table,
            slots,
            reader_id,
        })
    }

    /// Whether the daemon that serves the table is alive. Once it is not,
    /// connect again: nothing translates ([`crate::FaultKind::Detached`]),
    /// unless the table survives its daemon ([`TableReader::handed_over`]),
    /// in which case it goes on translating, frozen, until this client's
    /// slot file is handed to the next daemon ([`Self::hand_over`]).
    pub fn daemon_alive(&self) -> bool {
        self.table.writer_alive()
    }

    /// Tells the daemon, in one message, that this connection replaces the
    /// connections `replaced` (the reader IDs previous daemons gave this
    /// process's earlier clients: [`Self::reader_id`]) and what it holds of
    /// their tables: the slot files of those clients that still have a
    /// session or a pin, each retired first — sessions entered in it from
    /// now on fault — and waited for by the daemon, before it completes any
    /// revocation, until the sessions and pins left in them are over. At
    /// most [`backend_proto::MAX_PREVIOUS_FILES`] of each.
    pub fn hand_over(&self, previous: &[&SlotFile], replaced: &[u64]) -> Result<(), ClientError> {
        let mut fds = Vec::with_capacity(previous.len());
        for slots in previous {
            let fd = slots.fd().ok_or_else(|| ClientError::Io {
                step: "keep the previous slot file's descriptor",
                source: io::Error::from(io::ErrorKind::NotFound),
            })?;
            fds.push(fd);
        }
        for slots in previous {
            slots.retire();
        }
        let replaced = replaced.to_vec();
        self.request(
            |cookie| Message::PreviousTable {
                cookie,
                replaced: replaced.clone(),
            },
            &fds,
        )
    }

    /// The connection to the daemon (to poll it for the daemon's end of
    /// stream, or for diagnostics). Do not close it or write to it.
    pub fn connection(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Registers an io_uring that will do I/O into guest memory: the
    /// daemon then waits for the ring's in-flight requests to finish before
    /// it forgets this process's pins, should the process die with I/O in
    /// flight. Installs the ring's sentinel in its fixed-file table at
    /// `slot` (see [`drain::arm_ring_sentinel`]): call it before the ring's
    /// first I/O into guest memory, from the thread that submits on it.
    pub fn register_ring(
        &self,
        ring: BorrowedFd<'_>,
        slot: SentinelSlot,
    ) -> Result<(), ClientError> {
        let sentinel = drain::arm_ring_sentinel(ring, slot).map_err(|source| ClientError::Io {
            step: "install the ring's sentinel",
            source,
        })?;
        self.register(|cookie| Message::RegisterRing { cookie }, sentinel.as_fd())
    }

    /// Registers a connected TCP socket used for `MSG_ZEROCOPY` sends from
    /// guest memory: should the process die with such sends queued, the
    /// daemon waits until the kernel has sent them (and the socket's queue
    /// is empty) before it forgets this process's pins. Register it before
    /// its first zero-copy send.
    pub fn register_zerocopy_socket(&self, socket: BorrowedFd<'_>) -> Result<(), ClientError> {
        self.register(|cookie| Message::RegisterSocket { cookie }, socket)
    }

    /// Tells the daemon that the guest set a queue of `endpoint`'s device
    /// up anew ([`Message::DriverRestarted`]) and waits for its answer:
    /// when this returns, translations reflect any reset the daemon
    /// concluded from it. Call it outside any session.
    pub fn driver_restarted(&self, endpoint: u32) -> Result<(), ClientError> {
        self.request(|cookie| Message::DriverRestarted { cookie, endpoint }, &[])
    }

    fn register(
        &self,
        msg: impl Fn(u64) -> Message,
        fd: BorrowedFd<'_>,
    ) -> Result<(), ClientError> {
        self.request(msg, &[fd])
    }

    /// Sends a message that the daemon answers with ACK or ERROR (same
    /// cookie), and waits for the answer.
    fn request(
        &self,
        msg: impl Fn(u64) -> Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let _one_at_a_time = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        let cookie = self
            .next_cookie
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        backend_proto::send_with_fds(self.sock.as_fd(), &msg(cookie).encode(), fds).map_err(
            |source| ClientError::Io {
                step: "send a request",
                source,
            },
        )?;
        let mut buf = [0u8; MAX_LEN];
        loop {
            let answer = backend_proto::recv_message(self.sock.as_fd(), &mut buf)
                .map_err(|source| ClientError::Io {
                    step: "receive the daemon's answer",
                    source,
                })?
                .ok_or_else(|| ClientError::Protocol("the daemon closed the connection".into()))?;
            match answer {
                (Message::Ack { cookie: c }, _) if c == cookie => return Ok(()),
                (
                    Message::Error {
                        cookie: c,
                        code,
                        reason,
                    },
                    _,
                ) if c == cookie => {
                    return Err(ClientError::NotRegistered { code, reason });
                }
                (Message::Error { code, reason, .. }, _) => {
                    tracing::warn!(code, %reason, "the daemon refused a message of this backend");
                }
                (other, _) => {
                    return Err(ClientError::Protocol(format!("{other:?}")));
                }
            }
        }
    }

    /// Translates `[iova, iova + len)` of `endpoint` for reading, in one
    /// session of a slot claimed for it: each piece with its first IOVA,
    /// up to the first fault (diagnostics: `iotlb-reader lookup`).
    pub fn lookup(&self, endpoint: u32, iova: u64, len: u64) -> Result<Vec<LookedUp>, ClientError> {
        let mut slot = self.slots.claim_slot()?;
        let session = slot.enter(&self.table);
        let mut at = iova;
        let mut out = Vec::new();
        for piece in session.translate(endpoint, iova, len, crate::Access::READ) {
            match piece {
                Ok(p) => {
                    out.push(Ok((at, p)));
                    at = at.wrapping_add(p.len);
                }
                Err(f) => out.push(Err(f)),
            }
        }
        Ok(out)
    }

    /// Hands a fault to the daemon for the guest's event queue.
    pub fn report_fault(&self, fault: &Fault) -> Result<(), ClientError> {
        backend_proto::send_with_fds(self.sock.as_fd(), &Message::Fault(*fault).encode(), &[])
            .map_err(|source| ClientError::Io {
                step: "send fault",
                source,
            })
    }
}
