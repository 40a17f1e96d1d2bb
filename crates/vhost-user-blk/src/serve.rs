//! The listening loop: one VMM connection at a time; the device (its
//! engines, rings and IOMMU connection) outlives connections.

use tracing::{info, warn};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::settings::Listen;

/// Why the backend stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The VMM socket.
    #[error(transparent)]
    Listen(#[from] vhost_user_process::listen::ListenError),
    /// The vhost-user machinery failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
}

/// Serves VMM connections until the process is told to stop.
pub fn run(
    backend: &BlkBackend,
    listen: &Listen,
    socket_perms: vhost_user_process::socket_file::Permissions,
) -> Result<(), ServeError> {
    let mut listener = listen.listener(socket_perms)?;
    loop {
        let mut daemon = VhostUserDaemon::new(
            "vhost-user-blk".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        // Each queue's thread also wakes for its I/O completions.
        for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.completion_fd(i) {
                handler
                    .register_listener(fd, EventSet::IN, backend.completion_event())
                    .map_err(|e| {
                        ServeError::Daemon(format!("cannot watch queue {i}'s completions: {e}"))
                    })?;
            }
        }
        info!(socket = %listen.describe(), "waiting for a VMM to connect");
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        info!("VMM connected");
        let backlog =
            vhost_user_process::listen::WaitingVmmWatch::start(&listener, listen.describe());
        let ended = daemon.wait();
        drop(backlog);
        backend.quiesce();
        let stats = backend.stats();
        let (iotlb_misses, invalidations) = backend.iotlb_counters();
        info!(
            requests = stats.iter().map(|s| s.requests).sum::<u64>(),
            failed = stats.iter().map(|s| s.failed).sum::<u64>(),
            faults = backend.faults(),
            waited_for_pins = stats.iter().map(|s| s.deferred).sum::<u64>(),
            iotlb_misses,
            invalidations,
            "VMM connection over"
        );
        match ended {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("VMM disconnected; waiting for the next one"),
            Err(e) => {
                warn!(error = %e, "VMM connection ended with an error; waiting for the next one")
            }
        }
    }
}
