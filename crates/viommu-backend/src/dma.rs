//! A device's DMA: device addresses (guest-physical, or IOVAs of its
//! endpoint) to host addresses, in batches, with holds for I/O that
//! outlives a batch.
//!
//! - [`Dma`]: one per device, shared by its queue threads: the mode, the
//!   guest's memory table, the daemon connection.
//! - [`QueueDma`]: one per queue thread (in table mode it owns a session
//!   slot).
//! - [`Batch`]: one per drained batch of requests. In table mode it is one
//!   session of the shared table: translations are valid until it ends,
//!   and cost a few loads each.
//! - [`IoHold`]: what keeps the ranges of one in-flight I/O translatable
//!   after its batch ended (pins of the shared table; the memory table).
//!   Drop it once the kernel has finished the I/O.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use iotlb_shm::{
    Access, BackendClient, Fault, FaultKind, Pin, ReaderSlot, SentinelSlot, Session, SlotFile,
};

use crate::error::DmaError;
use crate::guest::{self, GuestRam, RamAccess};
use crate::mode::IommuMode;
use crate::msg::{MsgHold, MsgIotlb};

/// How often a backend whose daemon died tries to connect again (its
/// watcher thread and its batches try, so this bounds the connects a
/// guest's kicks can cause). Short: a VMM reconnects to the restarted
/// daemon before it sets up the backend's queues, and the first batch of
/// that set-up must find the new daemon; and the restarted daemon completes
/// no UNMAP until this backend has handed the previous table over.
const RECONNECT_EVERY: Duration = Duration::from_millis(100);
/// How long no daemon may answer before a reconnecting backend warns.
const GONE_WARN_AFTER: Duration = Duration::from_secs(10);
/// How long the watcher thread sleeps in `poll` on the daemon connection
/// before it checks whether the device is gone.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Why a device's DMA could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The daemon's backend socket refused or failed.
    #[error("connecting to the vhost-user-iommu daemon")]
    Connect(#[from] iotlb_shm::ClientError),
    /// No session slot is left for another queue thread.
    #[error("claiming a session slot")]
    Slot(#[from] iotlb_shm::SlotError),
}

/// The shared table as one connection to the daemon sees it.
#[derive(Debug)]
struct TableConnection {
    client: BackendClient,
    generation: u64,
}

/// What a device needs in table mode.
#[derive(Debug)]
struct TableState {
    socket: std::path::PathBuf,
    slots: u32,
    pins: u32,
    current: RwLock<Arc<TableConnection>>,
    /// `current`'s generation, read by every batch without the lock.
    generation: AtomicU64,
    /// Rings registered with the daemon, re-registered on reconnection.
    rings: Mutex<Vec<OwnedFd>>,
    /// When a batch last tried to reconnect (batches are paced).
    last_attempt: Mutex<Option<Instant>>,
    /// Held by the thread that reconnects.
    reconnecting: Mutex<()>,
    /// Since when no daemon answers, and whether that was warned about.
    gone_since: Mutex<Option<(Instant, bool)>>,
    /// Slot files of previous daemons' tables, retired, that may still
    /// have a session or pin; handed to every new daemon until idle.
    previous: Mutex<Vec<Arc<SlotFile>>>,
    /// Reader IDs of the connections the current one replaces, until a
    /// daemon has acknowledged it (then they are forgotten: that daemon
    /// keeps the current connection in its list instead).
    replaced: Mutex<Vec<u64>>,
    /// The generation whose daemon acknowledged the hand-over (the first
    /// connection, generation 0, replaces nothing).
    declared: AtomicU64,
    /// Queue threads between reading `generation` and entering their
    /// session: a reconnection retires the previous files only once none
    /// is (so no thread enters a session in a file retired under it).
    entering: AtomicU64,
}

#[derive(Debug)]
enum Translation {
    None,
    Table(TableState),
    Msg {
        /// Keeps the connection (and the slot file) for the device's life.
        _client: BackendClient,
        iotlb: Arc<MsgIotlb>,
    },
}

#[derive(Debug)]
struct Inner {
    endpoint: u32,
    translation: Translation,
    ram: RwLock<Option<Arc<GuestRam>>>,
    ram_generation: AtomicU64,
    faults_reported: AtomicU64,
}

/// One device's DMA; cheap to clone (clones share it).
#[derive(Debug, Clone)]
pub struct Dma {
    inner: Arc<Inner>,
}

/// What [`Dma::connect`] needs.
#[derive(Debug, Clone)]
pub struct DmaOptions {
    /// The mode (`--iommu`).
    pub mode: IommuMode,
    /// The device's endpoint ID (its requester ID in the guest).
    pub endpoint: u32,
    /// Session slots to ask the daemon for: one per queue thread, plus one.
    pub slots: u32,
    /// Pin records to ask for: at least the I/Os the device can have in
    /// flight at once.
    pub pins: u32,
}

impl Dma {
    /// Sets up the device's DMA; in table mode, connects to the daemon.
    pub fn connect(options: &DmaOptions) -> Result<Dma, SetupError> {
        let translation = match &options.mode {
            IommuMode::None => Translation::None,
            IommuMode::Table(socket) => {
                let client = BackendClient::connect(socket, options.slots, options.pins)?;
                tracing::info!(
                    socket = %socket.display(),
                    reader = client.reader_id,
                    endpoint = options.endpoint,
                    "DMA through the vhost-user-iommu shared table"
                );
                Translation::Table(TableState {
                    socket: socket.clone(),
                    slots: options.slots,
                    pins: options.pins,
                    current: RwLock::new(Arc::new(TableConnection {
                        client,
                        generation: 0,
                    })),
                    generation: AtomicU64::new(0),
                    rings: Mutex::new(Vec::new()),
                    last_attempt: Mutex::new(None),
                    reconnecting: Mutex::new(()),
                    gone_since: Mutex::new(None),
                    previous: Mutex::new(Vec::new()),
                    replaced: Mutex::new(Vec::new()),
                    declared: AtomicU64::new(0),
                    entering: AtomicU64::new(0),
                })
            }
            IommuMode::IotlbMsg(socket) => {
                let client = BackendClient::connect(socket, 1, 1)?;
                let io = |step| move |source| iotlb_shm::ClientError::Io { step, source };
                let sock = client
                    .connection()
                    .try_clone_to_owned()
                    .map_err(io("keep the connection"))?;
                let iotlb = MsgIotlb::start(sock.into(), options.endpoint)
                    .map_err(io("subscribe to invalidations"))?;
                tracing::info!(
                    socket = %socket.display(),
                    endpoint = options.endpoint,
                    "DMA through a private IOTLB filled by messages (baseline)"
                );
                Translation::Msg {
                    _client: client,
                    iotlb,
                }
            }
        };
        let dma = Dma {
            inner: Arc::new(Inner {
                endpoint: options.endpoint,
                translation,
                ram: RwLock::new(None),
                ram_generation: AtomicU64::new(0),
                faults_reported: AtomicU64::new(0),
            }),
        };
        if matches!(dma.inner.translation, Translation::Table(_)) {
            let weak = Arc::downgrade(&dma.inner);
            let spawned = std::thread::Builder::new()
                .name("iommu-daemon-watch".into())
                .spawn(move || watch_daemon(weak));
            if let Err(e) = spawned {
                // Batches still reconnect; an idle device only later.
                tracing::warn!(error = %e, "cannot start the thread that watches the vhost-user-iommu daemon");
            }
        }
        Ok(dma)
    }

    /// Whether device addresses are IOVAs (offer VIRTIO_F_ACCESS_PLATFORM).
    pub fn translates(&self) -> bool {
        !matches!(self.inner.translation, Translation::None)
    }

    /// The device's endpoint.
    pub fn endpoint(&self) -> u32 {
        self.inner.endpoint
    }

    /// Takes the VMM's (new) memory table.
    pub fn set_memory(&self, ram: Arc<GuestRam>) {
        *self
            .inner
            .ram
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(ram);
        self.inner.ram_generation.fetch_add(1, Ordering::Release);
    }

    /// Registers an io_uring that does I/O into guest memory with the
    /// daemon (table mode; nothing to do otherwise), before its first I/O:
    /// should this process die with I/O in flight, the guest's UNMAPs wait
    /// until the ring has drained. The ring's fixed-file slot 0 holds the
    /// sentinel (a one-slot table is registered when the ring has none).
    pub fn register_ring(&self, ring: BorrowedFd<'_>) -> Result<(), iotlb_shm::ClientError> {
        let Translation::Table(t) = &self.inner.translation else {
            return Ok(());
        };
        let conn = Arc::clone(&t.current.read().unwrap_or_else(PoisonError::into_inner));
        conn.client
            .register_ring(ring, SentinelSlot::NewTable { entries: 1 })?;
        let dup = ring
            .try_clone_to_owned()
            .map_err(|source| iotlb_shm::ClientError::Io {
                step: "keep the ring for re-registration",
                source,
            })?;
        t.rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(dup);
        Ok(())
    }

    /// A queue thread's handle.
    pub fn queue(&self) -> Result<QueueDma, SetupError> {
        let mut q = QueueDma {
            dma: self.clone(),
            ram: None,
            ram_generation: u64::MAX,
            table: None,
            scratch: Scratch::default(),
        };
        q.refresh_table()?;
        Ok(q)
    }

    /// Tells the daemon that the guest set one of this device's queues up
    /// anew (new ring addresses, or its index back to 0), and waits for
    /// its answer: if the IOMMU was stopped, the guest was reset without
    /// the VMM saying so, and the daemon drops the previous boot's
    /// mappings before this returns. Call it before the queue's first DMA,
    /// outside any batch. Nothing to do without an IOMMU.
    pub fn driver_restarted(&self) {
        let endpoint = self.inner.endpoint;
        let result = match &self.inner.translation {
            Translation::Table(t) => {
                // The restarted daemon must hear it: it decides about a reset.
                self.reconnect_if_detached(Reconnect::Wait);
                let conn = Arc::clone(&t.current.read().unwrap_or_else(PoisonError::into_inner));
                // A reset is a revocation, which waits for this process's
                // hand-over: never ask for one before it is made.
                if !hand_over_previous(t, &conn) {
                    return tracing::warn!(
                        endpoint,
                        "the guest set a queue up anew, but the daemon is not told before the previous table is handed over"
                    );
                }
                conn.client.driver_restarted(endpoint)
            }
            Translation::Msg { iotlb, .. } => {
                iotlb
                    .driver_restarted()
                    .map_err(|source| iotlb_shm::ClientError::Io {
                        step: "tell the daemon the guest set a queue up anew",
                        source,
                    })
            }
            Translation::None => return,
        };
        match result {
            Ok(()) => tracing::info!(
                endpoint,
                "the guest set a queue up anew; the daemon was told"
            ),
            Err(e) => tracing::warn!(
                endpoint,
                error = %e,
                "cannot tell the daemon that the guest set a queue up anew"
            ),
        }
    }

    /// Hands a fault to the daemon for the guest's event queue (table
    /// mode). Never waits long: a daemon that is gone or slow loses it.
    pub fn report_fault(&self, fault: &Fault) {
        self.inner.faults_reported.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?fault, "DMA fault");
        if fault.kind == FaultKind::Detached {
            return;
        }
        let result = match &self.inner.translation {
            Translation::Table(t) => {
                let conn = Arc::clone(&t.current.read().unwrap_or_else(PoisonError::into_inner));
                conn.client.report_fault(fault)
            }
            Translation::Msg { _client, .. } => _client.report_fault(fault),
            Translation::None => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "cannot report a fault to the daemon");
        }
    }

    /// Faults this device met.
    pub fn faults(&self) -> u64 {
        self.inner.faults_reported.load(Ordering::Relaxed)
    }

    /// Message mode: IOTLB misses resolved with the daemon, and
    /// invalidations received (0 in other modes).
    pub fn iotlb_counters(&self) -> (u64, u64) {
        match &self.inner.translation {
            Translation::Msg { iotlb, .. } => (iotlb.misses(), iotlb.invalidations()),
            _ => (0, 0),
        }
    }

    /// Connects to the daemon again if the current table is detached (its
    /// daemon died); re-registers the rings and hands the previous table
    /// over. One reconnection at a time: a [`Reconnect::Batch`] does not
    /// wait for another one in progress and tries at most once per
    /// [`RECONNECT_EVERY`]. Returns whether a live table is in place.
    fn reconnect_if_detached(&self, who: Reconnect) -> bool {
        let Translation::Table(t) = &self.inner.translation else {
            return false;
        };
        let _one_at_a_time = match who {
            Reconnect::Batch => match t.reconnecting.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return false,
            },
            Reconnect::Wait => t
                .reconnecting
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        };
        if t.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .client
            .daemon_alive()
        {
            return true; // another thread reconnected already
        }
        if who == Reconnect::Batch {
            let mut last = t
                .last_attempt
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|l| l.elapsed() < RECONNECT_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let generation = {
            let cur = t.current.read().unwrap_or_else(PoisonError::into_inner);
            if cur.client.daemon_alive() {
                return true; // another queue thread reconnected already
            }
            cur.generation
        };
        match BackendClient::connect(&t.socket, t.slots, t.pins) {
            Ok(client) => {
                for ring in t
                    .rings
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                {
                    // The ring's sentinel slot is replaced by a new sentinel
                    // for the new daemon.
                    if let Err(e) = client.register_ring(ring.as_fd(), SentinelSlot::Index(0)) {
                        tracing::warn!(error = %e, "cannot register a ring with the restarted daemon");
                    }
                }
                tracing::info!(
                    reader = client.reader_id,
                    "connected to the restarted vhost-user-iommu daemon"
                );
                *t.gone_since.lock().unwrap_or_else(PoisonError::into_inner) = None;
                let new = Arc::new(TableConnection {
                    client,
                    generation: generation + 1,
                });
                let old = std::mem::replace(
                    &mut *t.current.write().unwrap_or_else(PoisonError::into_inner),
                    Arc::clone(&new),
                );
                t.generation.store(generation + 1, Ordering::SeqCst);
                // A queue thread that read the old generation is about to
                // enter its session in the old file: let it, before the
                // file is retired (its session is then waited for).
                while t.entering.load(Ordering::SeqCst) != 0 {
                    std::thread::yield_now();
                }
                t.previous
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Arc::clone(&old.client.slots));
                t.replaced
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(old.client.reader_id);
                drop(old);
                // Queue threads move to the new table at their next batch;
                // the previous files are retired (no session starts in
                // them any more) and handed over: the new daemon completes
                // no revocation until the sessions and pins left in them
                // end.
                hand_over_previous(t, &new);
                true
            }
            Err(e) => {
                // A daemon that stops before its backends (a host shutting
                // down, a restart) is normal: said once; a long outage is
                // warned about once.
                let mut gone = t.gone_since.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                match *gone {
                    None => {
                        *gone = Some((now, false));
                        tracing::info!(error = %e, "the vhost-user-iommu daemon is gone; connecting again every 100 ms");
                    }
                    Some((since, false)) if now.duration_since(since) >= GONE_WARN_AFTER => {
                        *gone = Some((since, true));
                        tracing::warn!(
                            error = %e,
                            gone_s = now.duration_since(since).as_secs(),
                            "the vhost-user-iommu daemon is still gone; still connecting again every 100 ms"
                        );
                    }
                    Some(_) => {
                        tracing::debug!(error = %e, "the vhost-user-iommu daemon is still gone")
                    }
                }
                false
            }
        }
    }
}

/// Tells the daemon of `conn`, in one message, which connections this one
/// replaces and hands it the previous files still in use (forgetting those
/// with nothing left in them), unless that was done already. Returns
/// whether it is done; a failure is retried by the watcher thread.
fn hand_over_previous(t: &TableState, conn: &TableConnection) -> bool {
    if t.declared.load(Ordering::Acquire) == conn.generation {
        return true;
    }
    let mut previous = t.previous.lock().unwrap_or_else(PoisonError::into_inner);
    // Retired and idle: nothing of this process can use that table any more.
    previous.retain(|f| !(f.retired() && f.map().idle()));
    let mut replaced = t.replaced.lock().unwrap_or_else(PoisonError::into_inner);
    let max = iotlb_shm::backend_proto::MAX_PREVIOUS_FILES;
    if previous.len() > max || replaced.len() > max {
        // Eight restarts, each leaving DMA in flight: wait for some to end.
        tracing::warn!(
            files = previous.len(),
            connections = replaced.len(),
            "too much of previous daemons' tables is still in use to hand it over; waiting"
        );
        return false;
    }
    let files: Vec<&SlotFile> = previous.iter().map(|f| &**f).collect();
    match conn.client.hand_over(&files, &replaced) {
        Ok(()) => {
            t.declared.store(conn.generation, Ordering::Release);
            replaced.clear();
            tracing::info!(
                files = files.len(),
                "handed the previous daemon's table over"
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot hand the previous daemon's table over yet; the restarted daemon holds UNMAPs back until it is"
            );
            false
        }
    }
}

/// Who reconnects, and so how ([`Dma::reconnect_if_detached`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconnect {
    /// A queue thread starting a batch: never waits for another
    /// reconnection, tries at most once per [`RECONNECT_EVERY`].
    Batch,
    /// The watcher thread, or a call that needs the new daemon: waits for
    /// a reconnection in progress, tries now.
    Wait,
}

/// The watcher thread of a table-mode device: waits for the daemon
/// connection's end of stream and connects to the restarted daemon, so
/// that a device whose guest is idle hands the previous table over too.
/// Ends once the device is dropped.
fn watch_daemon(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let dma = Dma { inner };
        let Translation::Table(t) = &dma.inner.translation else {
            return;
        };
        let conn = Arc::clone(&t.current.read().unwrap_or_else(PoisonError::into_inner));
        if !conn.client.daemon_alive() {
            if !dma.reconnect_if_detached(Reconnect::Wait) {
                std::thread::sleep(RECONNECT_EVERY);
            }
            continue;
        }
        // A hand-over that failed is tried again.
        hand_over_previous(t, &conn);
        drop(dma);
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&conn.client.connection()),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one pollfd on a descriptor `conn` keeps open; bounded.
        let ready = unsafe { libc::poll(&mut p, 1, WATCH_EVERY.as_millis() as i32) };
        if ready > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
            // The daemon's end of stream comes as it exits, a moment after
            // the kernel marked its table dead: wait for that mark.
            let deadline = Instant::now() + Duration::from_secs(1);
            while conn.client.daemon_alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if conn.client.daemon_alive() {
                // The daemon closed this connection but lives: nothing to
                // reconnect to; look again later.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// A queue thread's translation handle.
#[derive(Debug)]
pub struct QueueDma {
    dma: Dma,
    /// Guest RAM, with its regions' host addresses for the fast path.
    ram: Option<RamAccess>,
    ram_generation: u64,
    /// Table mode: the connection this thread uses and its slot in it.
    table: Option<(Arc<TableConnection>, ReaderSlot)>,
    /// Buffers lent to each batch, so that translating allocates nothing.
    scratch: Scratch,
}

/// A batch's buffers: the guest-physical pieces of one range (message
/// mode), the host pieces gathered before any is handed out.
#[derive(Debug, Default)]
struct Scratch {
    gpa: Vec<(u64, u64)>,
    /// `(host address, length)`; addresses as integers so that the handle
    /// stays `Send`.
    host: Vec<(usize, u64)>,
}

impl QueueDma {
    /// The device this handle belongs to.
    pub fn dma(&self) -> &Dma {
        &self.dma
    }

    fn refresh_table(&mut self) -> Result<(), SetupError> {
        refresh_table(&self.dma, &mut self.table)
    }

    /// Starts a batch: picks up a new memory table, enters a session (table
    /// mode). A table whose daemon died yields a batch whose translations
    /// all fault; a new connection is tried for the next batch.
    pub fn batch(&mut self) -> Result<Batch<'_>, DmaError> {
        let generation = self.dma.inner.ram_generation.load(Ordering::Acquire);
        if generation != self.ram_generation {
            self.ram = self
                .dma
                .inner
                .ram
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .map(RamAccess::new);
            self.ram_generation = generation;
        }
        let table_mode = matches!(self.dma.inner.translation, Translation::Table(_));
        let entering = match &self.dma.inner.translation {
            Translation::Table(t) => {
                if self
                    .table
                    .as_ref()
                    .is_some_and(|(conn, _)| !conn.client.daemon_alive())
                {
                    self.dma.reconnect_if_detached(Reconnect::Batch);
                }
                // Counted from before the generation is read until the
                // session is entered (see `TableState::entering`).
                t.entering.fetch_add(1, Ordering::SeqCst);
                let stale = self
                    .table
                    .as_ref()
                    .is_none_or(|(c, _)| t.generation.load(Ordering::SeqCst) != c.generation);
                if stale {
                    if let Err(e) = refresh_table(&self.dma, &mut self.table) {
                        tracing::warn!(error = %e, "cannot move a queue to the restarted daemon's table");
                    }
                }
                Some(&t.entering)
            }
            _ => None,
        };
        let ram = match self.ram.as_ref() {
            Some(ram) => ram,
            None => {
                if let Some(e) = entering {
                    e.fetch_sub(1, Ordering::SeqCst);
                }
                return Err(DmaError::NoMemory);
            }
        };
        let session = match &mut self.table {
            Some((conn, slot)) => Some(slot.enter(&conn.client.table)),
            None => None,
        };
        if let Some(e) = entering {
            e.fetch_sub(1, Ordering::SeqCst);
        }
        let msg = match &self.dma.inner.translation {
            Translation::Msg { iotlb, .. } => Some((iotlb, iotlb.section())),
            _ => None,
        };
        Ok(Batch {
            ram: ram.ram(),
            flat: ram,
            session,
            table_mode,
            msg,
            scratch: std::cell::RefCell::new(std::mem::take(&mut self.scratch)),
            home: &mut self.scratch,
            endpoint: self.dma.inner.endpoint,
        })
    }
}

/// Moves a queue's session slot to the device's current connection if it
/// is on another one. The new slot is claimed before the old one goes: a
/// queue never loses its table (and a failed claim leaves it where it was).
fn refresh_table(
    dma: &Dma,
    table: &mut Option<(Arc<TableConnection>, ReaderSlot)>,
) -> Result<(), SetupError> {
    let Translation::Table(t) = &dma.inner.translation else {
        return Ok(());
    };
    let current = Arc::clone(&t.current.read().unwrap_or_else(PoisonError::into_inner));
    if table
        .as_ref()
        .is_some_and(|(c, _)| c.generation == current.generation)
    {
        return Ok(());
    }
    let slot = current.client.slots.claim_slot()?;
    *table = Some((current, slot));
    Ok(())
}

/// The translations of one batch; see the [module documentation](self).
#[derive(Debug)]
pub struct Batch<'a> {
    ram: &'a Arc<GuestRam>,
    /// The same RAM as flat regions: one range's host address in a few
    /// compares ([`Self::contiguous`]).
    flat: &'a RamAccess,
    session: Option<Session<'a>>,
    /// Table mode: without a session, nothing translates (never treat an
    /// IOVA as a guest-physical address).
    table_mode: bool,
    /// Message mode: the IOTLB, and this batch's read-side section of it.
    msg: Option<(&'a Arc<MsgIotlb>, std::sync::RwLockReadGuard<'a, ()>)>,
    /// The queue's buffers while the batch lasts; taken by each call (a
    /// call made from inside a callback finds it empty and allocates).
    scratch: std::cell::RefCell<Scratch>,
    home: &'a mut Scratch,
    endpoint: u32,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        *self.home = self.scratch.take();
    }
}

impl Batch<'_> {
    /// The fault of a table-mode batch that has no table.
    fn detached(&self, addr: u64, access: Access) -> DmaError {
        DmaError::Fault(Fault {
            kind: FaultKind::Detached,
            endpoint: self.endpoint,
            iova: addr,
            access,
        })
    }

    /// Runs `f` with the batch's buffers, host pieces emptied.
    fn with_scratch<T>(&self, f: impl FnOnce(&mut Scratch) -> T) -> T {
        let mut s = self.scratch.take();
        s.host.clear();
        let r = f(&mut s);
        self.scratch.replace(s);
        r
    }

    /// Appends the host pieces of the device range `[addr, addr + len)` to
    /// `s.host`, translating each byte once; fails if any byte does not
    /// translate, is MMIO, or lies outside guest RAM (the caller then
    /// discards what was appended).
    fn gather(&self, addr: u64, len: u64, access: Access, s: &mut Scratch) -> Result<(), DmaError> {
        if let Some((iotlb, _)) = &self.msg {
            iotlb.translate(self.endpoint, addr, len, access, &mut s.gpa)?;
            for &(gpa, l) in &s.gpa {
                guest::push_host_pieces(self.ram, gpa, l, &mut s.host)?;
            }
            return Ok(());
        }
        let Some(session) = &self.session else {
            if self.table_mode {
                return Err(self.detached(addr, access));
            }
            return guest::push_host_pieces(self.ram, addr, len, &mut s.host);
        };
        for p in session.translate(self.endpoint, addr, len, access) {
            let p = p?;
            if p.mmio {
                return Err(DmaError::Mmio { addr });
            }
            guest::push_host_pieces(self.ram, p.gpa, p.len, &mut s.host)?;
        }
        Ok(())
    }

    /// The host address of the device range `[addr, addr + len)` when it
    /// lies in one translation leaf and one RAM region, which is almost
    /// always: one cached or walked lookup and a few compares, nothing
    /// gathered. `None`: take the general path (which also tells why a
    /// range does not translate).
    #[inline]
    fn contiguous(&self, addr: u64, len: u64, access: Access) -> Option<*mut u8> {
        if len == 0 || self.msg.is_some() {
            return None;
        }
        let gpa = match &self.session {
            Some(session) => {
                let p = session.translate_one(self.endpoint, addr, access).ok()?;
                if p.mmio || p.len < len {
                    return None;
                }
                p.gpa
            }
            None if self.table_mode => return None,
            None => addr,
        };
        self.flat.host(gpa, len).ok()
    }

    /// Calls `piece(host, len)` for the host pieces of the device range
    /// `[addr, addr + len)`; fails before any call if any byte does not
    /// translate or lies outside guest RAM.
    pub fn for_each_piece(
        &self,
        addr: u64,
        len: u64,
        access: Access,
        mut piece: impl FnMut(*mut u8, u64),
    ) -> Result<(), DmaError> {
        self.with_scratch(|s| {
            self.gather(addr, len, access, s)?;
            for &(host, l) in &s.host {
                piece(host as *mut u8, l);
            }
            Ok(())
        })
    }

    /// The host address of a device range that must be contiguous in host
    /// memory (a ring, an indirect table).
    pub fn host_range(&self, addr: u64, len: u64, access: Access) -> Result<*mut u8, DmaError> {
        if let Some(host) = self.contiguous(addr, len, access) {
            return Ok(host);
        }
        self.with_scratch(|s| {
            self.gather(addr, len, access, s)?;
            match s.host.as_slice() {
                &[(host, l)] if l == len => Ok(host as *mut u8),
                _ => Err(DmaError::NotContiguous { addr, len }),
            }
        })
    }

    /// Copies device memory into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        if let Some(host) = self.contiguous(addr, buf.len() as u64, Access::READ) {
            // SAFETY: `host..host + buf.len()` lies in one region of guest
            // RAM kept mapped by this batch, and translated for reading in
            // its session; volatile loads, the guest may write concurrently.
            unsafe { guest::copy_from_guest(host, buf) };
            return Ok(());
        }
        let mut done = 0usize;
        self.for_each_piece(addr, buf.len() as u64, Access::READ, |host, l| {
            let l = l as usize;
            // SAFETY: `host` points at `l` bytes of guest RAM mapped for
            // this batch (the pieces add up to `buf.len()`); the copy uses
            // volatile loads because the guest may write them concurrently.
            unsafe { guest::copy_from_guest(host, &mut buf[done..done + l]) };
            done += l;
        })
    }

    /// Copies `data` into device memory.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        if let Some(host) = self.contiguous(addr, data.len() as u64, Access::WRITE) {
            // SAFETY: `host..host + data.len()` lies in one region of guest
            // RAM kept mapped by this batch, and translated for writing in
            // its session; volatile stores, the guest shares the memory.
            unsafe { guest::copy_to_guest(data, host) };
            return Ok(());
        }
        let mut done = 0usize;
        self.for_each_piece(addr, data.len() as u64, Access::WRITE, |host, l| {
            let l = l as usize;
            // SAFETY: `host` points at `l` writable bytes of guest RAM
            // mapped for this batch (the pieces add up to `data.len()`);
            // volatile stores because the guest shares them.
            unsafe { guest::copy_to_guest(&data[done..done + l], host) };
            done += l;
        })
    }

    /// Keeps the device ranges translatable, and guest RAM mapped, until the
    /// returned hold is dropped (after the I/O that uses them completed),
    /// and calls `piece(host, len)` for their host pieces in order (only
    /// once all of them translated): in table mode, pins the ranges
    /// (contiguous ones as one pin, translated by the same walk that checks
    /// the pin); the daemon completes no UNMAP overlapping them meanwhile.
    pub fn hold(
        &self,
        ranges: &[(u64, u64)],
        access: Access,
        mut piece: impl FnMut(*mut u8, u64),
    ) -> Result<IoHold, DmaError> {
        self.with_scratch(|s| {
            let hold = self.hold_gathering(ranges, access, s)?;
            for &(host, l) in &s.host {
                piece(host as *mut u8, l);
            }
            Ok(hold)
        })
    }

    fn hold_gathering(
        &self,
        ranges: &[(u64, u64)],
        access: Access,
        s: &mut Scratch,
    ) -> Result<IoHold, DmaError> {
        let mut hold = IoHold {
            _ram: Arc::clone(self.ram),
            pins: Pins::default(),
            _msg: self.msg.as_ref().map(|(iotlb, _)| iotlb.hold(ranges)),
        };
        let Some(session) = &self.session else {
            // No IOMMU (or, in table mode, no table: `gather` faults).
            for &(addr, len) in ranges {
                self.gather(addr, len, access, s)?;
            }
            return Ok(hold);
        };
        let mut i = 0;
        while i < ranges.len() {
            let (start, mut len) = ranges[i];
            i += 1;
            while i < ranges.len() && start.checked_add(len) == Some(ranges[i].0) {
                len += ranges[i].1;
                i += 1;
            }
            s.gpa.clear();
            let mut mmio = false;
            let pin = session
                .pin_each(self.endpoint, start, len, access, |p| {
                    mmio |= p.mmio;
                    s.gpa.push((p.gpa, p.len));
                })
                .map_err(|e| match e {
                    iotlb_shm::PinError::Fault(f) => DmaError::Fault(f),
                    iotlb_shm::PinError::Slots(s) => DmaError::from(s),
                })?;
            hold.pins.push(pin);
            if mmio {
                return Err(DmaError::Mmio { addr: start });
            }
            for &(gpa, l) in &s.gpa {
                guest::push_host_pieces(self.ram, gpa, l, &mut s.host)?;
            }
        }
        Ok(hold)
    }
}

/// The pins of one hold; most I/O has one range, held without allocating.
#[derive(Debug, Default)]
struct Pins {
    first: Option<Pin>,
    rest: Vec<Pin>,
}

impl Pins {
    fn push(&mut self, pin: Pin) {
        if self.first.is_none() {
            self.first = Some(pin);
        } else {
            self.rest.push(pin);
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }
}

/// Keeps one in-flight I/O's ranges usable; see [`Batch::hold`].
#[derive(Debug)]
pub struct IoHold {
    _ram: Arc<GuestRam>,
    pins: Pins,
    _msg: Option<MsgHold>,
}

impl IoHold {
    /// Pins held.
    pub fn pins(&self) -> usize {
        self.pins.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// A device with no IOMMU over two RAM regions: [0, 16K) and [16K, 24K),
    /// separate mappings, so a range crossing 16K is two host pieces.
    fn device() -> Dma {
        let dma = Dma::connect(&DmaOptions {
            mode: IommuMode::None,
            endpoint: 0,
            slots: 1,
            pins: 1,
        })
        .unwrap();
        let ram = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0x2000),
        ])
        .unwrap();
        dma.set_memory(Arc::new(ram));
        dma
    }

    #[test]
    fn pieces_are_handed_out_only_when_the_whole_range_is_guest_ram() {
        let dma = device();
        let mut q = dma.queue().unwrap();
        let b = q.batch().unwrap();
        let mut lens = Vec::new();
        b.for_each_piece(0x3000, 0x2000, Access::READ, |_, l| lens.push(l))
            .unwrap();
        assert_eq!(lens, vec![0x1000, 0x1000]);
        let mut called = false;
        assert!(matches!(
            b.for_each_piece(0x5000, 0x2000, Access::READ, |_, _| called = true),
            Err(DmaError::OutsideRam { .. })
        ));
        assert!(matches!(
            b.hold(
                &[(0x1000, 0x1000), (0x5800, 0x1000)],
                Access::WRITE,
                |_, _| { called = true }
            ),
            Err(DmaError::OutsideRam { .. })
        ));
        assert!(!called, "no piece of a range that fails is handed out");
        assert!(matches!(
            b.host_range(0x3000, 0x2000, Access::READ),
            Err(DmaError::NotContiguous { .. })
        ));
        assert!(b.host_range(0x4000, 0x2000, Access::READ).is_ok());
        assert!(b.read(u64::MAX, &mut [0; 2]).is_err());
    }

    #[test]
    fn data_round_trips_across_regions_and_calls_may_nest() {
        let dma = device();
        let mut q = dma.queue().unwrap();
        let b = q.batch().unwrap();
        let data: Vec<u8> = (0..=255).cycle().take(0x1800).collect();
        b.write(0x3800, &data).unwrap();
        let mut back = vec![0; data.len()];
        b.read(0x3800, &mut back).unwrap();
        assert_eq!(back, data);
        // A callback that uses the batch again (its buffers are lent out).
        let mut nested = Vec::new();
        let hold = b
            .hold(
                &[(0x3800, 0x1000), (0x4800, 0x800)],
                Access::READ,
                |_, l| {
                    let mut first = [0u8; 1];
                    b.read(0x3800, &mut first).unwrap();
                    nested.push((first[0], l));
                },
            )
            .unwrap();
        assert_eq!(nested, vec![(0, 0x800), (0, 0x800), (0, 0x800)]);
        assert_eq!(hold.pins(), 0, "no pins without an IOMMU");
    }
}
