//! The backend's side of the backend socket: connect to the daemon, get
//! the table and a slot file, report faults.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::access::Fault;
use crate::backend_proto::{self, MAX_LEN, Message, WELCOME_FDS};
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
    /// The table it sent does not open.
    #[error("opening the daemon's table")]
    Table(#[from] OpenError),
    /// The slot file it sent does not open.
    #[error("opening the daemon's slot file")]
    Slots(#[from] SlotError),
}

/// A backend connected to the daemon: its view of the table and its slots.
/// Dropping it disconnects; the daemon then forgets the slots.
#[derive(Debug)]
pub struct BackendClient {
    sock: UnixStream,
    /// The table, read-only.
    pub table: TableReader,
    /// This process's slot file.
    pub slots: Arc<SlotFile>,
    /// The daemon's ID for this reader.
    pub reader_id: u64,
}

impl BackendClient {
    /// Connects to the daemon's backend socket and asks for `slots` session
    /// slots and `pins` pin records (0 = the daemon's defaults).
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
            table,
            slots,
            reader_id,
        })
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
