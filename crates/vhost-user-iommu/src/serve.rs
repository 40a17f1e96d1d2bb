//! The listening loop: one VMM connection at a time, each with a fresh
//! device (a new connection is the "system reset" of AMB-16) — except the
//! first one after a restart, which gets the device of the saved state
//! (`--state-dir`).

use crate::admin::DaemonView;
use crate::backend::{FAULT_WAKE_EVENT, IommuBackend};
use crate::backend_ledger::{Ledger, LedgerError};
use crate::backend_socket::{BackendBook, BackendSocket, FaultRoute};
use crate::fd_store::{CarriedBackend, FdStore};
use crate::iotlb_msg::Subscribers;
use crate::publish::{NoTable, TablePublisher};
use crate::settings::{KickLoopKind, Listen, Settings};
use crate::shm_table::{self, SharedWriter, ShmPublisher};
use crate::state_journal::{self, Resumed, StateJournal, StateStoreError};
use crate::telemetry::Telemetry;
use iotlb_shm::drain::RingSentinel;
use iotlb_shm::{ReaderProcess, TableWriter, TrackedIo};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use tracing::{debug, info, warn};
use vhost_user_backend::VhostUserDaemon;
use viommu_core::Device;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Why the daemon stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The VMM socket cannot be served.
    #[error(transparent)]
    Listen(#[from] vhost_user_process::listen::ListenError),
    /// The device could not be built.
    #[error("cannot create the device")]
    Device(#[from] viommu_core::ConfigError),
    /// The vhost-user machinery failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// The shared table could not be created.
    #[error("cannot create the shared translation table: {0}")]
    Table(String),
    /// The system-call filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The backend socket could not be created.
    #[error("cannot listen for backends on {0}")]
    BackendSocket(String, #[source] std::io::Error),
    /// The admin socket or metrics endpoint could not be started.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The saved device state cannot be loaded, or no state can be kept.
    #[error(transparent)]
    State(#[from] StateStoreError),
    /// The state directory's list of backends cannot be used.
    #[error("cannot use the state directory's list of backends")]
    Ledger(#[from] LedgerError),
}

/// The shared table and what serves it to backends.
struct Table {
    writer: SharedWriter,
    subscribers: Subscribers,
    /// This daemon's backends and its predecessor's.
    ledger: Arc<Ledger>,
    book: BackendBook,
    /// Served by the control plane once it starts.
    socket: Option<BackendSocket>,
}

/// The first connection's device: the one the state directory holds, if
/// any, else a fresh one (with a journal started when a directory is set).
fn first_device(settings: &Settings) -> Result<Resumed, ServeError> {
    let Some(dir) = &settings.state_dir else {
        return Ok(Resumed::fresh(Device::new(settings.device.clone())?));
    };
    let started = std::time::Instant::now();
    match state_journal::load(dir, &settings.device)? {
        Some(restored) => {
            let load_ms = started.elapsed().as_secs_f64() * 1e3;
            let journal = StateJournal::resume(dir, &restored, &settings.device)?;
            info!(
                state = %dir.join(state_journal::FILE_NAME).display(),
                records = restored.records,
                torn_last_record = restored.torn_tail,
                domains = restored.device.domain_count(),
                mappings = restored.device.mapping_count(),
                features = format_args!("{:#x}", restored.device.negotiated_features().0),
                recent_requests = restored.applied.len(),
                load_ms = format_args!("{load_ms:.1}"),
                "device state restored: the guest's domains and mappings carry on when its VMM reconnects"
            );
            Ok(Resumed {
                device: restored.device,
                journal: Some(journal),
                applied: restored.applied,
                restored: true,
            })
        }
        None => next_device(settings),
    }
}

/// A fresh device for a new VMM connection, its journal (re)started.
fn next_device(settings: &Settings) -> Result<Resumed, ServeError> {
    let device = Device::new(settings.device.clone())?;
    let journal = match &settings.state_dir {
        Some(dir) => {
            let j = StateJournal::start(dir, &device)?;
            debug!(state = %dir.join(state_journal::FILE_NAME).display(), "device state journal started");
            Some(j)
        }
        None => None,
    };
    Ok(Resumed {
        journal,
        ..Resumed::fresh(device)
    })
}

/// Describes where the daemon listens, for logs.
pub fn describe(listen: &Listen) -> String {
    listen.describe()
}

/// Creates the shared table and starts the backend socket, if configured.
fn start_table(
    settings: &Settings,
    route: &FaultRoute,
    carried: Vec<CarriedBackend>,
) -> Result<Option<Table>, ServeError> {
    let Some(t) = &settings.table else {
        info!("no --backend-socket: translations are not published to backends");
        return Ok(None);
    };
    let stall = iotlb_shm::StallPolicy {
        warn_after: t.stall_warn,
        kill_after: t.stall_kill,
    };
    // With a state directory the backends are recorded there, so the table
    // may outlive this daemon: the next one waits for them.
    let ledger = match &settings.state_dir {
        Some(dir) => Ledger::open(dir, stall)?,
        None => Ledger::in_memory(stall),
    };
    let ledger = Arc::new(ledger);
    let writer = shm_table::create(&settings.device, t, settings.state_dir.is_some())
        .map_err(ServeError::Table)?;
    let g = *writer.geometry();
    let fd_store = FdStore::from_env().map(Arc::new);
    let mut writer = writer;
    // Reader IDs name one connection across restarts: each daemon numbers
    // from a value of its own.
    writer.number_readers_from(crate::fd_store::daemon_nonce() << 24);
    // The awaited connections stay awaited: what the store carried adds
    // exact tracking of their I/O, the hand-over still orders the release.
    let carried_names = register_carried(&mut writer, carried);
    if let Some(store) = &fd_store {
        ledger.forget_carried_later(Arc::clone(store), carried_names);
    }
    let writer: SharedWriter = Arc::new(Mutex::new(writer));
    let subscribers = Subscribers::new(stall);
    let socket_error = |e| ServeError::BackendSocket(t.socket.display().to_string(), e);
    let socket = BackendSocket::bind(
        &t.socket,
        t.allowed_uids.clone(),
        writer.clone(),
        route.clone(),
        subscribers.clone(),
    )
    .map_err(socket_error)?
    .with_ledger(Arc::clone(&ledger))
    .with_fd_store(fd_store);
    let book = socket.book();
    info!(
        backend_socket = %t.socket.display(),
        max_mib = t.max_mib,
        endpoints = g.endpoint_count,
        input_bits = g.input_bits,
        "shared translation table ready; backends connect to the backend socket"
    );
    Ok(Some(Table {
        writer,
        subscribers,
        ledger,
        book,
        socket: Some(socket),
    }))
}

/// Registers the backends of the previous daemon that systemd's store
/// carried over as readers of the previous table; returns the names they
/// were stored under.
fn register_carried(writer: &mut TableWriter, carried: Vec<CarriedBackend>) -> Vec<String> {
    let mut names = Vec::new();
    for b in carried {
        // Each slot file of the process (its own with the previous daemon,
        // and those it had handed over to it) is waited for on its own.
        let register = |writer: &mut TableWriter, slots: &OwnedFd| match &b.pidfd {
            Some(pidfd) => match pidfd.try_clone() {
                Ok(pidfd) => {
                    let process = ReaderProcess {
                        pid: b.pid,
                        pidfd,
                        connection: None,
                    };
                    writer.register_previous(slots.as_fd(), process, None)
                }
                Err(_) => writer.register_previous_of_gone(slots.as_fd(), b.pid),
            },
            None => writer.register_previous_of_gone(slots.as_fd(), b.pid),
        };
        for earlier in &b.previous {
            if let Err(e) = register(writer, earlier) {
                warn!(pid = b.pid, error = %vhost_user_process::report_line(&e), "an earlier table's slot file of a stored backend cannot be tracked");
            }
        }
        let registered = register(writer, &b.slots);
        let id = match registered {
            Ok(id) => id,
            Err(e) => {
                warn!(pid = b.pid, error = %vhost_user_process::report_line(&e), "a stored backend of the previous daemon cannot be tracked");
                continue;
            }
        };
        let mut rings = 0;
        for fd in b.rings {
            // A sentinel that hung up: that ring is gone, nothing to wait for.
            if let Ok(sentinel) = RingSentinel::new(fd) {
                if writer.track_io(id, TrackedIo::Ring(sentinel)).is_ok() {
                    rings += 1;
                }
            }
        }
        info!(
            pid = b.pid,
            rings,
            "a backend of the previous daemon, from systemd's descriptor store: revocations wait until it has finished with the previous table (or exited with its rings drained)"
        );
        names.extend(b.names);
    }
    names
}

/// Serves connections until the process is told to stop. With
/// `settings.seccomp`, the system-call filter is installed on every thread
/// of the process once the sockets are bound: a program that embeds the
/// daemon and does more than serve must turn it off.
pub fn run(settings: &Settings, listen: &Listen) -> Result<(), ServeError> {
    run_carrying(settings, listen, Vec::new())
}

/// [`run`], with the backends of a previous daemon that systemd's
/// descriptor store carried over ([`crate::fd_store`]).
pub fn run_carrying(
    settings: &Settings,
    listen: &Listen,
    carried: Vec<CarriedBackend>,
) -> Result<(), ServeError> {
    let mut listener = listen.listener(settings.socket_perms)?;
    let where_ = describe(listen);
    let route = FaultRoute::default();
    // Locked before anything reads or writes the state directory.
    let _state_dir = settings
        .state_dir
        .as_deref()
        .map(state_journal::lock)
        .transpose()?;
    let mut table = start_table(settings, &route, carried)?;
    let telemetry = Arc::new(Telemetry::default());
    crate::control::start(
        crate::control::ControlSettings {
            admin_socket: settings.admin_socket.as_deref(),
            metrics_addr: settings.metrics_addr,
        },
        DaemonView {
            telemetry: Arc::clone(&telemetry),
            route: route.clone(),
            writer: table.as_ref().map(|t| t.writer.clone()),
            book: table.as_ref().map(|t| t.book.clone()),
        },
        table.as_mut().and_then(|t| t.socket.take()),
    )?;
    let mut resumed = Some(first_device(settings)?);
    // Every socket is bound: from here on only the calls serving needs.
    crate::seccomp::install(settings.seccomp)?;
    loop {
        let device = match resumed.take() {
            Some(r) => r,
            None => next_device(settings)?,
        };
        let publisher: Box<dyn TablePublisher> = match &table {
            Some(t) => Box::new(
                ShmPublisher::new(t.writer.clone(), Some(t.subscribers.clone()))
                    .timed(Arc::clone(&telemetry))
                    .waiting_for_previous(Arc::clone(&t.ledger)),
            ),
            None => Box::new(NoTable),
        };
        let backend = IommuBackend::with_device(
            device,
            settings.queue_size,
            settings.poll,
            publisher,
            Arc::clone(&telemetry),
        );
        let mut daemon = VhostUserDaemon::new(
            "vhost-user-iommu".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(
                    backend.fault_wake_fd(),
                    EventSet::IN,
                    u64::from(FAULT_WAKE_EVENT),
                )
                .map_err(|e| ServeError::Daemon(format!("cannot watch the fault eventfd: {e}")))?;
        }
        if settings.kick_loop == KickLoopKind::Uring {
            let handler = daemon.get_epoll_handlers().into_iter().next();
            match handler.map(|h| backend.enable_kick_loop(h, settings.cpu)) {
                Some(Ok(())) => debug!("request-queue kicks on io_uring"),
                Some(Err(e)) => warn!(
                    error = %e,
                    "io_uring unavailable: request-queue kicks stay on the epoll thread"
                ),
                None => warn!("no epoll handler: request-queue kicks stay on the epoll thread"),
            }
        }
        info!(socket = %where_, "waiting for a VMM to connect");
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        info!("VMM connected");
        // Backends' faults reach this guest only from now on: one reported
        // between two VMMs concerns the previous guest (or none), and is
        // dropped.
        route.set(Some(backend.clone()));
        telemetry
            .vmm_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let backlog = vhost_user_process::listen::WaitingVmmWatch::start(&listener, where_.clone());
        let ended = daemon.wait();
        drop(backlog);
        route.set(None);
        backend.shutdown();
        telemetry.connection_ended(backend.fault_stats());
        match ended {
            // A VMM that closes its socket is the normal end of a connection.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("VMM disconnected; the device is gone with its domains and mappings"),
            Err(e) => {
                warn!(error = %e, "VMM connection ended with an error; waiting for the next one")
            }
        }
    }
}
