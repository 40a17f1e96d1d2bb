//! The backend socket: co-located backends connect, are checked, receive
//! the shared table and their own slot file, register the rings and
//! sockets that do I/O into guest memory, and report faults
//! (`docs/backend-protocol.md`). One task per connected backend, on the
//! control plane's runtime.
//!
//! A backend is forgotten by the table only when nothing it started can
//! still touch guest memory (`iotlb_shm::registry`): it closed its slot
//! file, or its process exited, its connection is closed everywhere and
//! its registered I/O drained. A malformed message is answered with ERROR
//! and never ends the backend's registration; its task stays until the
//! backend is released, so [`MAX_BACKENDS`] also bounds backends that are
//! gone but not yet released.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use iotlb_shm::backend_proto::{self, FrameError, MAX_LEN, MAX_PREVIOUS_FILES, Message};
use iotlb_shm::drain::{self, RingSentinel, TrackError};
use iotlb_shm::{Access, Fault, FaultKind, ReaderId, ReaderProcess, ReaderState, TrackedIo};
use tracing::{debug, error, info, warn};
use virtio_iommu_proto::{FaultFlags, FaultReason, FaultRecord};

use tokio::io::unix::AsyncFd;

use crate::backend::IommuBackend;
use crate::backend_ledger::Ledger;
use crate::fd_store::{FdStore, backend_name};
use crate::frame_ready;
use crate::iotlb_msg::Subscribers;
use crate::shm_table::{SharedWriter, lock};

/// Session slots a backend gets when it asks for 0.
pub const DEFAULT_SLOTS: u32 = 64;
/// Pin records a backend gets when it asks for 0.
pub const DEFAULT_PINS: u32 = 1024;
/// How long a backend may take to say HELLO.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a gone backend is checked for release.
const RELEASE_POLL: Duration = Duration::from_millis(20);
/// How long a backend's state must last before it is logged.
const STATE_LOG_AFTER: Duration = Duration::from_millis(200);
/// Previous slot files of one process registered at once (the registry
/// stays bounded whatever a backend sends).
pub const MAX_PREVIOUS: usize = 2 * MAX_PREVIOUS_FILES;
/// Ring sentinels of one backend kept in systemd's descriptor store.
const MAX_STORED_RINGS: usize = 64;
/// Protocol errors logged per backend connection; later ones are counted.
const LOGGED_ERRORS: u32 = 8;

/// Where backend-reported faults go: the device of the current VMM
/// connection, if any.
#[derive(Clone, Default)]
pub struct FaultRoute(Arc<Mutex<Option<IommuBackend>>>);

impl FaultRoute {
    /// Routes faults to `device` from now on (`None`: drop them).
    pub fn set(&self, device: Option<IommuBackend>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = device;
    }

    /// The device of the current VMM connection, if any.
    pub fn device(&self) -> Option<IommuBackend> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Hands a backend's fault to the guest's event queue.
    pub fn report(&self, fault: &Fault) {
        let record = FaultRecord {
            reason: match fault.kind {
                FaultKind::Domain | FaultKind::Detached => FaultReason::Domain,
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
        if fault.kind == FaultKind::Detached {
            return debug!(
                ?fault,
                "a backend reported a fault of a dead daemon's table; dropped"
            );
        }
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

    /// A backend saw the guest set `endpoint`'s queue up anew: the device
    /// decides whether that means a reset it was not told of, and applies
    /// it before this returns.
    pub fn driver_restarted(&self, pid: i32, endpoint: u32) {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(device) => device.endpoint_driver_restarted(pid, endpoint),
            None => debug!(
                pid,
                endpoint, "endpoint driver restarted with no VMM connected"
            ),
        }
    }

    /// Answers a message-mode backend's IOTLB miss on `stream`, under the
    /// device lock: an answer is always on the wire before the invalidation
    /// of what it answered.
    pub fn answer_miss(
        &self,
        stream: &UnixStream,
        cookie: u64,
        endpoint: u32,
        access: u8,
        iova: u64,
    ) {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let access_kind = Access::from_bits(access).unwrap_or(Access::READ);
        let fault = |kind| Message::IotlbFault {
            cookie,
            fault: Fault {
                kind,
                endpoint,
                iova,
                access: access_kind,
            },
        };
        let send = |msg: Message| {
            if let Err(e) = backend_proto::send_with_fds(stream.as_fd(), &msg.encode(), &[]) {
                debug!(error = %e, "cannot answer a backend's IOTLB miss");
            }
        };
        let Some(device) = guard.as_ref() else {
            return send(fault(FaultKind::Domain));
        };
        device.with_translation(endpoint, iova, access_kind, |t| match t {
            Ok(t) if !t.mmio => {
                // The whole mapping from the missed page on, capped at 1 GiB
                // (a bypassed endpoint translates everything).
                let first = iova & !0xfff;
                let size = (t.iova_last - first).min((1 << 30) - 1) + 1;
                send(Message::IotlbUpdate {
                    cookie,
                    endpoint,
                    perm: access,
                    iova: first,
                    size,
                    gpa: t.gpa - (iova - first),
                })
            }
            Ok(_) => send(fault(FaultKind::Mapping)),
            Err(reason) => send(fault(match reason {
                FaultReason::Domain => FaultKind::Domain,
                _ => FaultKind::Mapping,
            })),
        });
    }
}

/// A backend as the admin socket shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    /// Its process ID (at connection).
    pub pid: i32,
    /// Its user ID.
    pub uid: u32,
    /// Session slots it was given.
    pub slots: u32,
    /// Pin records it was given.
    pub pins: u32,
    /// Whether its connection is still open (a backend that closed it
    /// stays listed until it is released).
    pub connected: bool,
}

/// The backends that received the table and are not released yet, by
/// reader ID.
#[derive(Clone, Default, Debug)]
pub struct BackendBook(Arc<Mutex<std::collections::BTreeMap<u64, BackendEntry>>>);

impl BackendBook {
    fn with<R>(
        &self,
        f: impl FnOnce(&mut std::collections::BTreeMap<u64, BackendEntry>) -> R,
    ) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Every backend listed, by reader ID.
    pub fn entries(&self) -> Vec<(u64, BackendEntry)> {
        self.with(|b| b.iter().map(|(&id, &e)| (id, e)).collect())
    }

    /// Backends whose connection is open.
    pub fn connected(&self) -> usize {
        self.with(|b| b.values().filter(|e| e.connected).count())
    }
}

/// The listening backend socket.
pub struct BackendSocket {
    book: BackendBook,
    listener: UnixListener,
    table_fd: OwnedFd,
    arena_fd: OwnedFd,
    allowed_uids: Vec<u32>,
    writer: SharedWriter,
    route: FaultRoute,
    subscribers: Subscribers,
    connected: std::sync::atomic::AtomicUsize,
    ledger: Arc<Ledger>,
    fd_store: Option<Arc<FdStore>>,
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
    let cred = iotlb_shm::sockopt::peer_credentials(sock.as_fd())?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
    })
}

impl BackendSocket {
    /// Binds `path` where nothing live is (a stale socket file is
    /// replaced, anything else refused: `vhost_user_process::socket_file`).
    pub fn bind(
        path: &Path,
        allowed_uids: Vec<u32>,
        writer: SharedWriter,
        route: FaultRoute,
        subscribers: Subscribers,
    ) -> io::Result<Self> {
        // Other users must be able to reach the socket for their uid to be
        // checked (SO_PEERCRED). Without --backend-uid the file keeps the
        // umask's permissions as a first line of defence.
        let mode = (!allowed_uids.is_empty()).then_some(0o666);
        let listener = vhost_user_process::socket_file::bind(
            path,
            vhost_user_process::socket_file::Permissions { mode, group: None },
        )
        .map_err(io::Error::other)?;
        let (table_fd, arena_fd) = {
            let w = lock(&writer);
            (
                w.table_fd().try_clone_to_owned()?,
                w.arena_fd().try_clone_to_owned()?,
            )
        };
        Ok(Self {
            book: BackendBook::default(),
            listener,
            table_fd,
            arena_fd,
            allowed_uids,
            writer,
            route,
            subscribers,
            connected: std::sync::atomic::AtomicUsize::new(0),
            ledger: Arc::new(Ledger::in_memory(iotlb_shm::StallPolicy::default())),
            fd_store: None,
        })
    }

    /// Keeps every backend's slot file, pidfd and ring sentinels in
    /// systemd's descriptor store until it is released
    /// ([`crate::fd_store`]).
    pub fn with_fd_store(mut self, store: Option<Arc<FdStore>>) -> Self {
        self.fd_store = store;
        self
    }

    /// Records backends in `ledger` (the state directory's, so that the
    /// next daemon waits for them) and takes their hand-overs of a previous
    /// daemon's table there.
    pub fn with_ledger(mut self, ledger: Arc<Ledger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// The backends served, for the admin socket and metrics.
    pub fn book(&self) -> BackendBook {
        self.book.clone()
    }

    /// Accepts backends forever on a thread of its own, running
    /// [`Self::run`] on a current-thread runtime (for programs without a
    /// control plane; the daemon runs it on its control-plane runtime).
    pub fn spawn(self) -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        std::thread::Builder::new()
            .name("backend-socket".into())
            .spawn(move || runtime.block_on(self.run()))?;
        Ok(())
    }

    /// Accepts backends forever, each served by a task of the current
    /// runtime. Everything that may wait (the table and device locks,
    /// which a grace period holds) runs on the runtime's blocking pool, one
    /// step at a time per backend, so its messages keep their order and no
    /// backend can stall the others or the rest of the control plane.
    pub async fn run(self) {
        let me = Arc::new(self);
        let listener = match me
            .listener
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .and_then(tokio::net::UnixListener::from_std)
        {
            Ok(l) => l,
            Err(e) => return warn!(error = %e, "cannot serve the backend socket"),
        };
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "backend socket accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Served as a blocking std socket (see `frame_ready`).
            let stream = match stream.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot take a backend connection");
                    continue;
                }
            };
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
            tokio::spawn(async move {
                Arc::clone(&me2).serve(stream).await;
                me2.connected.fetch_sub(1, Relaxed);
            });
        }
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
        let _ = backend_proto::try_send(stream.as_fd(), &msg.encode());
    }

    /// Runs `f` on the blocking pool; `None` if it panicked.
    async fn blocking<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> R + Send + 'static,
    ) -> Option<R> {
        let me = Arc::clone(self);
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "a backend-socket step failed");
                None
            }
        }
    }

    async fn serve(self: Arc<Self>, stream: UnixStream) {
        let cred = match peer_cred(&stream) {
            Ok(c) => c,
            Err(e) => return warn!(error = %e, "cannot identify a backend (SO_PEERCRED)"),
        };
        // The pidfd is taken now, before anything waits: it names the very
        // process that connected (SO_PEERPIDFD), never a reused PID.
        let process = match ReaderProcess::of_peer(stream.as_fd()) {
            Ok(p) => p,
            Err(e) => {
                return Self::refuse(
                    &stream,
                    libc::ESRCH,
                    format!("cannot watch process {}: {e}", cred.pid),
                );
            }
        };
        let stream = Arc::new(stream);
        // SAFETY: the Arc the AsyncFd holds keeps the socket (and so its
        // descriptor, always the same one) open for the AsyncFd's life.
        let watched = unsafe {
            AsyncFd::register_with_interest(Arc::clone(&stream), tokio::io::Interest::READABLE)
        };
        let watched = match watched {
            Ok(w) => w,
            Err(e) => {
                return warn!(error = %io::Error::from(e), "cannot watch a backend connection");
            }
        };
        let mut buf = [0u8; MAX_LEN];
        let hello = tokio::time::timeout(
            HELLO_TIMEOUT,
            frame_ready::wait(&watched, frame_ready::whole_message_queued),
        )
        .await;
        let hello = match hello {
            Ok(Ok(())) => backend_proto::recv_message(stream.as_fd(), &mut buf),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no HELLO in time")),
        };
        let (slots, pins) = match hello {
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
        let pidfd = process.pidfd.try_clone().ok();
        let registered = {
            let slot_fd = match slot_fd.try_clone() {
                Ok(fd) => fd,
                Err(e) => return Self::refuse(&stream, libc::EMFILE, e.to_string()),
            };
            self.blocking(move |me| lock(&me.writer).register_process(slot_fd.as_fd(), process))
                .await
        };
        let id = match registered {
            Some(Ok(id)) => id,
            Some(Err(e)) => return Self::refuse(&stream, libc::ESRCH, format!("{e}")),
            None => return Self::refuse(&stream, libc::EIO, "registration failed".into()),
        };
        // Recorded before it gets the table, so that a daemon started after
        // this one dies knows to wait for it.
        let pid = cred.pid;
        let admitted = self
            .blocking(move |me| {
                me.ledger.admit(id.0, pid).inspect_err(|_| {
                    lock(&me.writer).unregister_reader(id);
                })
            })
            .await;
        match admitted {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                let reason = vhost_user_process::report_line(&e);
                error!(pid, %reason, "cannot record a backend in the state directory; refused");
                return Self::refuse(&stream, libc::EIO, reason);
            }
            None => return Self::refuse(&stream, libc::EIO, "registration failed".into()),
        }
        // Stored before it gets the table too (a daemon started by systemd
        // after this one dies gets them back).
        let mut stored = Vec::new();
        if let Some(store) = &self.fd_store {
            store.keep(
                &mut stored,
                backend_name(pid, id.0, "slots"),
                slot_fd.as_fd(),
            );
            if let Some(pidfd) = &pidfd {
                store.keep(&mut stored, backend_name(pid, id.0, "pidfd"), pidfd.as_fd());
            }
        }
        drop(pidfd);
        let welcome = Message::Welcome { reader_id: id.0 }.encode();
        let fds = [
            self.table_fd.as_fd(),
            self.arena_fd.as_fd(),
            slot_fd.as_fd(),
        ];
        // A fresh connection's buffer is empty: the send does not wait.
        if let Err(e) = backend_proto::send_with_fds(stream.as_fd(), &welcome, &fds) {
            // The backend may still have the files (a partial send): its
            // registration ends by the usual rules, not here.
            warn!(error = %e, pid = cred.pid, "cannot send the table to a backend");
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
        self.book.with(|b| {
            b.insert(
                id.0,
                BackendEntry {
                    pid: cred.pid,
                    uid: cred.uid,
                    slots,
                    pins,
                    connected: true,
                },
            )
        });
        let mut conn = Connection {
            stream: Arc::clone(&stream),
            pid: cred.pid,
            id,
            errors: 0,
            declared: false,
            stored,
        };
        self.read_messages(&watched, &mut conn, &mut buf).await;
        self.subscribers.remove(id);
        self.book.with(|b| {
            if let Some(e) = b.get_mut(&id.0) {
                e.connected = false;
            }
        });
        info!(
            pid = cred.pid,
            reader = id.0,
            "backend disconnected; its slots and pins count until it has closed them or exited with its I/O drained"
        );
        drop(watched);
        self.wait_for_release(id, cred.pid).await;
        // Kept listed (and stored) while a previous table it handed over is
        // in use: a daemon started after this one must still wait for it.
        let pid = cred.pid;
        loop {
            let left = self
                .blocking(move |me| {
                    let mut w = lock(&me.writer);
                    w.release_previous_readers();
                    w.readers().previous_of(pid)
                })
                .await;
            if left.unwrap_or(0) == 0 {
                break;
            }
            tokio::time::sleep(RELEASE_POLL).await;
        }
        self.blocking(move |me| me.ledger.forget(id.0)).await;
        if let Some(store) = &self.fd_store {
            store.forget(&conn.stored);
        }
        self.book.with(|b| b.remove(&id.0));
    }

    /// Reads the backend's messages until its end of stream. Nothing here
    /// ends the backend's registration.
    async fn read_messages(
        self: &Arc<Self>,
        watched: &frame_ready::Watched,
        conn: &mut Connection,
        buf: &mut [u8; MAX_LEN],
    ) {
        loop {
            if let Err(e) = frame_ready::wait(watched, frame_ready::whole_message_queued).await {
                return warn!(pid = conn.pid, error = %e, "backend connection failed");
            }
            let frame = match backend_proto::recv_frame(conn.stream.as_fd(), buf) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(FrameError::Framing(e)) => {
                    conn.error(
                        0,
                        libc::EPROTO,
                        format!("{e}; framing lost, no further message of this connection is read"),
                    );
                    return conn.discard_until_end(watched).await;
                }
                // A backend that exits with messages of ours unread (an
                // invalidation, an answer) resets the connection: that is
                // its end, not a failure.
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return debug!(
                        pid = conn.pid,
                        "backend closed its connection with messages unread"
                    );
                }
                Err(FrameError::Io(e)) => {
                    return warn!(pid = conn.pid, error = %e, "backend connection failed");
                }
            };
            let msg = match backend_proto::Message::decode(&buf[..frame.len]) {
                Ok(m) => m,
                Err(e) => {
                    conn.error(0, libc::EPROTO, format!("malformed message: {e}"));
                    continue;
                }
            };
            let cookie = msg.cookie();
            if frame.fds_truncated {
                conn.error(
                    cookie,
                    libc::EPROTO,
                    "more descriptors attached than a message may carry; they were discarded"
                        .into(),
                );
                continue;
            }
            match msg {
                Message::Fault(f) if frame.fds.is_empty() => {
                    self.blocking(move |me| me.route.report(&f)).await;
                }
                Message::RegisterRing { cookie } | Message::RegisterSocket { cookie }
                    if frame.fds.len() != 1 =>
                {
                    conn.error(
                        cookie,
                        libc::EPROTO,
                        format!(
                            "a registration carries 1 descriptor, not {}",
                            frame.fds.len()
                        ),
                    );
                }
                Message::RegisterRing { cookie } => {
                    let kept = frame.fds.first().and_then(|f| f.try_clone().ok());
                    let io = frame
                        .fds
                        .into_iter()
                        .next()
                        .ok_or_else(|| TrackError::Unsuitable("no descriptor".into()))
                        .and_then(RingSentinel::new)
                        .map(TrackedIo::Ring);
                    let room = conn.stored.len() < MAX_STORED_RINGS + 2 + MAX_PREVIOUS;
                    if self.track(conn, cookie, io).await && room {
                        if let (Some(store), Some(fd)) = (&self.fd_store, kept) {
                            let name = backend_name(conn.pid, conn.id.0, &format!("ring-{cookie}"));
                            store.keep(&mut conn.stored, name, fd.as_fd());
                        }
                    }
                }
                Message::RegisterSocket { cookie } => {
                    let fds = frame.fds;
                    // sock_diag queries: off the event loop.
                    let io = self
                        .blocking(move |_| match fds.first() {
                            Some(fd) => drain::tcp_endpoints(fd.as_fd()).map(TrackedIo::Socket),
                            None => Err(TrackError::Unsuitable("no descriptor".into())),
                        })
                        .await
                        .unwrap_or_else(|| Err(TrackError::Unsuitable("query failed".into())));
                    self.track(conn, cookie, io).await;
                }
                Message::IotlbSubscribe { cookie } if frame.fds.is_empty() => {
                    match conn.stream.try_clone() {
                        Ok(stream) => {
                            let pidfd = iotlb_shm::ReaderProcess::of_peer(conn.stream.as_fd())
                                .ok()
                                .map(|p| p.pidfd);
                            self.subscribers.add(conn.id, conn.pid, stream, pidfd);
                            conn.reply(&Message::Ack { cookie });
                        }
                        Err(e) => {
                            conn.error(cookie, libc::EMFILE, format!("cannot subscribe: {e}"))
                        }
                    }
                }
                Message::IotlbMiss {
                    cookie,
                    endpoint,
                    access,
                    iova,
                } if frame.fds.is_empty() => {
                    let stream = Arc::clone(&conn.stream);
                    self.blocking(move |me| {
                        me.route
                            .answer_miss(&stream, cookie, endpoint, access, iova)
                    })
                    .await;
                }
                Message::Ack { cookie } if frame.fds.is_empty() => {
                    self.subscribers.ack(conn.id, cookie);
                }
                Message::PreviousTable { cookie, .. } if conn.declared => {
                    conn.error(
                        cookie,
                        libc::EPROTO,
                        "this connection already said which connections it replaces".into(),
                    );
                }
                Message::PreviousTable { cookie, replaced }
                    if frame.fds.len() <= MAX_PREVIOUS_FILES =>
                {
                    let (stream, pid, id) = (Arc::clone(&conn.stream), conn.pid, conn.id);
                    let fds = frame.fds;
                    let result = self
                        .blocking(move |me| me.take_previous(&stream, pid, id, fds, &replaced))
                        .await
                        .unwrap_or_else(|| Err((libc::EIO, "the hand-over failed".into())));
                    match result {
                        Ok(stored) => {
                            conn.declared = true;
                            conn.stored.extend(stored);
                            conn.reply(&Message::Ack { cookie });
                        }
                        Err((code, reason)) => conn.error(cookie, code, reason),
                    }
                }
                Message::DriverRestarted { cookie, endpoint } if frame.fds.is_empty() => {
                    let pid = conn.pid;
                    // May reset the device and wait for a grace period.
                    self.blocking(move |me| me.route.driver_restarted(pid, endpoint))
                        .await;
                    conn.reply(&Message::Ack { cookie });
                }
                other => conn.error(
                    cookie,
                    libc::EPROTO,
                    format!(
                        "unexpected {} after WELCOME",
                        message_name(&other, !frame.fds.is_empty())
                    ),
                ),
            }
        }
    }

    /// Connection `current` of backend `pid` replaces its connections
    /// `replaced` to previous daemons and hands over what it holds of their
    /// tables: slot files `fds` (retired), each waited for by every
    /// revocation until the sessions and pins left in it are over. All are
    /// checked before any is registered, a failure registers none, and the
    /// replaced connections are no longer awaited only once all are.
    /// Returns the names the files were stored under in systemd's store;
    /// the error is an errno value and a reason.
    fn take_previous(
        &self,
        stream: &UnixStream,
        pid: i32,
        current: ReaderId,
        fds: Vec<OwnedFd>,
        replaced: &[u64],
    ) -> Result<Vec<String>, (i32, String)> {
        let einval = |reason: String| (libc::EINVAL, reason);
        for fd in &fds {
            let slots = iotlb_shm::slots::SlotMap::open(fd.as_fd(), false).map_err(|e| {
                einval(format!(
                    "not a slot file: {}",
                    vhost_user_process::report_line(&e)
                ))
            })?;
            if !slots.retired() {
                return Err(einval(
                    "a previous slot file must be retired before it is handed over".into(),
                ));
            }
        }
        let mut stored = Vec::new();
        if !fds.is_empty() {
            let mut w = lock(&self.writer);
            if w.readers().previous_of(pid) + fds.len() > MAX_PREVIOUS {
                return Err((
                    libc::ENOSPC,
                    format!("more than {MAX_PREVIOUS} previous slot files of this process in use"),
                ));
            }
            // Before the first is registered: a revocation that looks from
            // now on finds them (Ledger::pending).
            self.ledger.previous_registered();
            let mut ids = Vec::with_capacity(fds.len());
            for fd in &fds {
                // Watched through its pidfd only: its release does not
                // depend on the connection, which stays with `current`.
                let registered = ReaderProcess::of_peer(stream.as_fd())
                    .map_err(|e| (libc::ESRCH, e.to_string()))
                    .and_then(|p| {
                        let process = ReaderProcess {
                            pid,
                            pidfd: p.pidfd,
                            connection: None,
                        };
                        w.register_previous(fd.as_fd(), process, Some(current))
                            .map_err(|e| einval(vhost_user_process::report_line(&e)))
                    });
                match registered {
                    Ok(id) => ids.push(id),
                    Err(e) => {
                        for id in ids {
                            w.unregister_reader(id);
                        }
                        return Err(e);
                    }
                }
            }
            drop(w);
            if let Some(store) = &self.fd_store {
                for (fd, id) in fds.iter().zip(&ids) {
                    let name = backend_name(pid, current.0, &format!("previous-{}", id.0));
                    store.keep(&mut stored, name, fd.as_fd());
                }
            }
            info!(
                pid,
                files = fds.len(),
                "backend handed over previous daemons' tables; revocations wait until its sessions and pins there are over"
            );
        }
        let resolved = self.ledger.handed_over(pid, replaced);
        if resolved > 0 {
            info!(
                pid,
                connections = resolved,
                "a backend of the previous daemon reconnected"
            );
        }
        Ok(stored)
    }

    async fn track(
        self: &Arc<Self>,
        conn: &mut Connection,
        cookie: u64,
        io: Result<TrackedIo, TrackError>,
    ) -> bool {
        let id = conn.id;
        let result = self
            .blocking(move |me| {
                io.and_then(|io| {
                    let what = io.describe();
                    lock(&me.writer).track_io(id, io).map(|()| what)
                })
            })
            .await
            .unwrap_or_else(|| Err(TrackError::Unsuitable("tracking failed".into())));
        match result {
            Ok(what) => {
                info!(pid = conn.pid, reader = conn.id.0, %what, "backend registered I/O to wait for should it die");
                conn.reply(&Message::Ack { cookie });
                true
            }
            Err(e) => {
                conn.error(cookie, e.code(), format!("cannot track it: {e}"));
                false
            }
        }
    }

    /// After the backend's end of stream: waits until the table may forget
    /// it, logging each change of its state. Its task (and its place in
    /// the [`MAX_BACKENDS`] bound) is kept until then.
    async fn wait_for_release(self: &Arc<Self>, id: ReaderId, pid: i32) {
        // A process that exits closes its descriptors a moment before it
        // is reaped: a state is only logged once it has lasted a while.
        let mut logged = None;
        let mut since = (None, std::time::Instant::now());
        loop {
            let state = self
                .blocking(move |me| lock(&me.writer).try_release_reader(id))
                .await;
            let state = match state {
                None => {
                    tokio::time::sleep(RELEASE_POLL).await;
                    continue;
                }
                Some(None) => return,
                Some(Some(ReaderState::Released(reason))) => {
                    return info!(
                        pid,
                        reader = id.0,
                        ?reason,
                        "backend released: its slots and pins no longer count"
                    );
                }
                Some(Some(s)) => s,
            };
            if since.0 != Some(state) {
                since = (Some(state), std::time::Instant::now());
            }
            if logged != Some(state) && since.1.elapsed() >= STATE_LOG_AFTER {
                logged = Some(state);
                match state {
                    ReaderState::Draining { pending } => info!(
                        pid,
                        reader = id.0,
                        pending,
                        "backend exited; waiting for its registered I/O to drain"
                    ),
                    ReaderState::ConnectionHeld | ReaderState::Lingering => {
                        warn!(pid, reader = id.0, "backend {}", state.describe())
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(RELEASE_POLL).await;
        }
    }
}

/// A message's name for an error reply (never its contents: a HELLO is
/// named, a FAULT is named).
fn message_name(msg: &Message, with_fds: bool) -> String {
    let name = match msg {
        Message::Hello { .. } => "HELLO",
        Message::Welcome { .. } => "WELCOME",
        Message::Refused { .. } => "REFUSED",
        Message::Fault(_) => "FAULT",
        Message::RegisterRing { .. } => "REGISTER_RING",
        Message::RegisterSocket { .. } => "REGISTER_SOCKET",
        Message::Ack { .. } => "ACK",
        Message::Error { .. } => "ERROR",
        Message::IotlbSubscribe { .. } => "IOTLB_SUBSCRIBE",
        Message::IotlbMiss { .. } => "IOTLB_MISS",
        Message::IotlbUpdate { .. } => "IOTLB_UPDATE",
        Message::IotlbFault { .. } => "IOTLB_FAULT",
        Message::IotlbInvalidate { .. } => "IOTLB_INVALIDATE",
        Message::DriverRestarted { .. } => "DRIVER_RESTARTED",
        Message::PreviousTable { .. } => "PREVIOUS_TABLE",
    };
    if with_fds {
        format!("{name} with descriptors")
    } else {
        name.to_string()
    }
}

/// One backend's connection after WELCOME.
struct Connection {
    stream: Arc<UnixStream>,
    pid: i32,
    id: ReaderId,
    errors: u32,
    /// The connection said what it holds of previous tables
    /// (PREVIOUS_TABLE, accepted once).
    declared: bool,
    /// Names of the descriptors kept in systemd's store for it.
    stored: Vec<String>,
}

impl Connection {
    /// Answers without waiting: a backend that does not read its answers
    /// loses them, it never stalls the control plane.
    fn reply(&self, msg: &Message) {
        if let Err(e) = backend_proto::try_send(self.stream.as_fd(), &msg.encode()) {
            debug!(pid = self.pid, error = %e, "cannot answer a backend; answer dropped");
        }
    }

    /// Refuses one message with ERROR; the connection and the backend's
    /// registration go on.
    fn error(&mut self, cookie: u64, code: i32, reason: String) {
        self.errors = self.errors.saturating_add(1);
        if self.errors <= LOGGED_ERRORS {
            warn!(
                pid = self.pid,
                reader = self.id.0,
                %reason,
                "refused a message from a backend; it stays connected and its sessions and pins keep counting"
            );
            if self.errors == LOGGED_ERRORS {
                warn!(
                    pid = self.pid,
                    "further protocol errors of this backend are not logged"
                );
            }
        }
        self.reply(&Message::Error {
            cookie,
            code: code as u32,
            reason,
        });
    }

    /// Reads and drops everything (descriptors included) until the end of
    /// stream, once the framing is lost.
    async fn discard_until_end(&self, watched: &frame_ready::Watched) {
        let mut buf = [0u8; MAX_LEN];
        loop {
            if let Err(e) = frame_ready::wait(watched, frame_ready::anything_queued).await {
                return debug!(pid = self.pid, error = %e, "backend connection failed");
            }
            match backend_proto::recv_discard(self.stream.as_fd(), &mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => return debug!(pid = self.pid, error = %e, "backend connection failed"),
            }
        }
    }
}
