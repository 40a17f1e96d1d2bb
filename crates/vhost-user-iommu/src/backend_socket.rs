//! The backend socket: co-located backends connect, are checked, receive
//! the shared table and their own slot file, and report faults
//! (`docs/backend-protocol.md`). One thread per connected backend; a
//! backend that disconnects or dies is forgotten by the table at once.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use iotlb_shm::backend_proto::{self, MAX_LEN, Message};
use iotlb_shm::{Access, Fault, FaultKind};
use tracing::{debug, info, warn};
use virtio_iommu_proto::{FaultFlags, FaultReason, FaultRecord};

use crate::backend::IommuBackend;
use crate::shm_table::{SharedWriter, lock};

/// Session slots a backend gets when it asks for 0.
pub const DEFAULT_SLOTS: u32 = 64;
/// Pin records a backend gets when it asks for 0.
pub const DEFAULT_PINS: u32 = 1024;
/// How long a backend may take to say HELLO.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Where backend-reported faults go: the device of the current VMM
/// connection, if any.
#[derive(Clone, Default)]
pub struct FaultRoute(Arc<Mutex<Option<IommuBackend>>>);

impl FaultRoute {
    /// Routes faults to `device` from now on (`None`: drop them).
    pub fn set(&self, device: Option<IommuBackend>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = device;
    }

    /// Hands a backend's fault to the guest's event queue.
    pub fn report(&self, fault: &Fault) {
        let record = FaultRecord {
            reason: match fault.kind {
                FaultKind::Domain => FaultReason::Domain,
                FaultKind::Mapping | FaultKind::Permission => FaultReason::Mapping,
            },
            access: FaultFlags(
                (if fault.access.bits() & Access::READ.bits() != 0 {
                    FaultFlags::READ.0
                } else {
                    0
                }) | (if fault.access.bits() & Access::WRITE.bits() != 0 {
                    FaultFlags::WRITE.0
                } else {
                    0
                }),
            ),
            endpoint: fault.endpoint,
            address: Some(fault.iova),
        };
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(device) => {
                if let Err(e) = device.report_fault(record) {
                    warn!(error = %e, "cannot queue a backend's fault");
                }
            }
            None => debug!(?fault, "backend fault with no VMM connected; dropped"),
        }
    }
}

/// The listening backend socket.
pub struct BackendSocket {
    listener: UnixListener,
    table_fd: OwnedFd,
    arena_fd: OwnedFd,
    allowed_uids: Vec<u32>,
    writer: SharedWriter,
    route: FaultRoute,
    connected: std::sync::atomic::AtomicUsize,
}

/// Most backend connections served at once; more are refused (`EBUSY`), so
/// a runaway client cannot exhaust the daemon's threads.
pub const MAX_BACKENDS: usize = 256;

/// The peer of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process ID.
    pub pid: i32,
    /// User ID.
    pub uid: u32,
}

/// Reads SO_PEERCRED.
pub fn peer_cred(sock: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live ucred.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
    })
}

impl BackendSocket {
    /// Binds `path` (replacing a stale socket file there).
    pub fn bind(
        path: &Path,
        allowed_uids: Vec<u32>,
        writer: SharedWriter,
        route: FaultRoute,
    ) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = if allowed_uids.is_empty() {
            UnixListener::bind(path)?
        } else {
            // Other users must be able to reach the socket for their uid to
            // be checked (SO_PEERCRED): bind under a temporary name, open it
            // up, then rename, so the path never exists with the wrong mode.
            // Without --backend-uid the file keeps the umask's permissions
            // as a first line of defence.
            use std::os::unix::fs::PermissionsExt;
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(format!(".{}.tmp", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let listener = UnixListener::bind(&tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666))?;
            std::fs::rename(&tmp, path)?;
            listener
        };
        let (table_fd, arena_fd) = {
            let w = lock(&writer);
            (
                w.table_fd().try_clone_to_owned()?,
                w.arena_fd().try_clone_to_owned()?,
            )
        };
        Ok(Self {
            listener,
            table_fd,
            arena_fd,
            allowed_uids,
            writer,
            route,
            connected: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Accepts backends forever on a thread of its own.
    pub fn spawn(self) -> io::Result<()> {
        std::thread::Builder::new()
            .name("backend-socket".into())
            .spawn(move || {
                let me = Arc::new(self);
                for conn in me.listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            use std::sync::atomic::Ordering::Relaxed;
                            if me.connected.fetch_add(1, Relaxed) >= MAX_BACKENDS {
                                me.connected.fetch_sub(1, Relaxed);
                                Self::refuse(
                                    &stream,
                                    libc::EBUSY,
                                    format!("{MAX_BACKENDS} backends already connected"),
                                );
                                continue;
                            }
                            let me2 = Arc::clone(&me);
                            let spawned = std::thread::Builder::new().name("backend".into()).spawn(
                                move || {
                                    me2.serve(stream);
                                    me2.connected.fetch_sub(1, Relaxed);
                                },
                            );
                            if let Err(e) = spawned {
                                me.connected.fetch_sub(1, Relaxed);
                                warn!(error = %e, "cannot start a thread for a backend");
                            }
                        }
                        Err(e) => warn!(error = %e, "backend socket accept failed"),
                    }
                }
            })?;
        Ok(())
    }

    fn allowed(&self, uid: u32) -> bool {
        // SAFETY: getuid has no failure mode and no memory effects.
        let own = unsafe { libc::getuid() };
        uid == 0 || uid == own || self.allowed_uids.contains(&uid)
    }

    fn refuse(stream: &UnixStream, code: i32, reason: String) {
        warn!(%reason, "backend refused");
        let msg = Message::Refused {
            code: code as u32,
            reason,
        };
        let _ = backend_proto::send_with_fds(stream.as_fd(), &msg.encode(), &[]);
    }

    fn serve(&self, stream: UnixStream) {
        let cred = match peer_cred(&stream) {
            Ok(c) => c,
            Err(e) => return warn!(error = %e, "cannot identify a backend (SO_PEERCRED)"),
        };
        let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
        let mut buf = [0u8; MAX_LEN];
        let (slots, pins) = match backend_proto::recv_message(stream.as_fd(), &mut buf) {
            Ok(Some((Message::Hello { slots, pins }, _))) => (slots, pins),
            Ok(Some((other, _))) => {
                return Self::refuse(
                    &stream,
                    libc::EPROTO,
                    format!("expected HELLO, got {other:?}"),
                );
            }
            Ok(None) => return debug!(pid = cred.pid, "backend left before HELLO"),
            Err(e) => return Self::refuse(&stream, libc::EPROTO, format!("bad HELLO: {e}")),
        };
        // Refused only once HELLO is read, so that the backend is not cut
        // off mid-send and always receives the reason.
        if !self.allowed(cred.uid) {
            return Self::refuse(
                &stream,
                libc::EACCES,
                format!("uid {} is not allowed (see --backend-uid)", cred.uid),
            );
        }
        let slots = if slots == 0 { DEFAULT_SLOTS } else { slots };
        let pins = if pins == 0 { DEFAULT_PINS } else { pins };
        let slot_fd = match iotlb_shm::slots::create(slots as usize, pins as usize) {
            Ok(fd) => fd,
            Err(e) => return Self::refuse(&stream, libc::EINVAL, e.to_string()),
        };
        let id = match lock(&self.writer).register_reader(slot_fd.as_fd(), cred.pid) {
            Ok(id) => id,
            Err(e) => return Self::refuse(&stream, libc::ESRCH, format!("{e}")),
        };
        let welcome = Message::Welcome { reader_id: id.0 }.encode();
        let fds = [
            self.table_fd.as_fd(),
            self.arena_fd.as_fd(),
            slot_fd.as_fd(),
        ];
        if let Err(e) = backend_proto::send_with_fds(stream.as_fd(), &welcome, &fds) {
            warn!(error = %e, pid = cred.pid, "cannot send the table to a backend");
            lock(&self.writer).unregister_reader(id);
            return;
        }
        drop(slot_fd);
        info!(
            pid = cred.pid,
            uid = cred.uid,
            reader = id.0,
            slots,
            pins,
            "backend connected; table sent"
        );
        let _ = stream.set_read_timeout(None);
        loop {
            match backend_proto::recv_message(stream.as_fd(), &mut buf) {
                Ok(Some((Message::Fault(f), _))) => self.route.report(&f),
                Ok(Some((other, _))) => {
                    warn!(
                        pid = cred.pid,
                        ?other,
                        "unexpected message from a backend; disconnecting it"
                    );
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(pid = cred.pid, error = %e, "backend connection failed; disconnecting it");
                    break;
                }
            }
        }
        lock(&self.writer).unregister_reader(id);
        info!(
            pid = cred.pid,
            reader = id.0,
            "backend disconnected; its slots and pins are released"
        );
    }
}
