//! Each port's VMM connections, one at a time, on a thread of the port's
//! own; the port (its queues, counters, daemon connection) outlives them.
//! A VMM that disconnects stops only its own port's queues.

use std::sync::Arc;

use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::PortBackend;
use crate::pmd::Switch;

/// Why a port stopped serving.
#[derive(Debug, thiserror::Error)]
#[error("port {port}: vhost-user daemon failed: {message}")]
pub struct ServeError {
    port: String,
    message: String,
}

/// Serves the VMM connections of `backend`'s port until the process
/// ends.
pub fn run(
    switch: &Switch,
    backend: &PortBackend,
    mut listener: Listener,
) -> Result<(), ServeError> {
    let port = Arc::clone(backend.port());
    let failed = |e: &dyn std::fmt::Display| ServeError {
        port: port.name.clone(),
        message: e.to_string(),
    };
    loop {
        let mut daemon = VhostUserDaemon::new(
            format!("vhost-user-net-{}", port.id),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| failed(&e))?;
        info!(port = %port.name, "waiting for a VMM to connect");
        daemon.start(&mut listener).map_err(|e| failed(&e))?;
        info!(port = %port.name, "VMM connected");
        let ended = daemon.wait();
        port.detach_all();
        switch.fib.forget_port(port.id);
        info!(port = %port.name, "VMM connection over: {}", port.stats.snapshot());
        match ended {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!(port = %port.name, "VMM disconnected; waiting for the next one"),
            Err(e) => {
                warn!(port = %port.name, error = %e, "VMM connection ended with an error; waiting for the next one")
            }
        }
    }
}
