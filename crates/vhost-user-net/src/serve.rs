//! Each port's VMM connections, one at a time, on a thread of the port's
//! own; the port (its queues, counters, daemon connection) outlives them.
//! A VMM that disconnects stops only its own port's queues. Each connection
//! reaches the framework through [`crate::relay`] (QEMU's message order).

use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;

use tracing::{debug, info, warn};
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
pub fn run(switch: &Switch, backend: &PortBackend, listener: Listener) -> Result<(), ServeError> {
    let port = Arc::clone(backend.port());
    let failed = |e: &dyn std::fmt::Display| ServeError {
        port: port.name.clone(),
        message: e.to_string(),
    };
    // The framework listens on a private (abstract) socket, reached only
    // through the relay.
    let private = SocketAddr::from_abstract_name(format!(
        "vhost-user-net-{}-port{}",
        std::process::id(),
        port.id
    ))
    .map_err(|e| failed(&e))?;
    let inner = UnixListener::bind_addr(&private).map_err(|e| failed(&e))?;
    // SAFETY: the descriptor comes from a listening socket this function
    // owns and gives up here; nothing else refers to it.
    let mut inner = unsafe { Listener::from_raw_fd(inner.into_raw_fd()) };
    loop {
        let mut daemon = VhostUserDaemon::new(
            format!("vhost-user-net-{}", port.id),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| failed(&e))?;
        info!(port = %port.name, "waiting for a VMM to connect");
        let vmm = loop {
            match listener.accept() {
                Ok(Some(s)) => break s,
                Ok(None) => continue,
                Err(e) => return Err(failed(&e)),
            }
        };
        let framework = UnixStream::connect_addr(&private).map_err(|e| failed(&e))?;
        daemon.start(&mut inner).map_err(|e| failed(&e))?;
        info!(port = %port.name, "VMM connected");
        let name = port.name.clone();
        let relay = std::thread::Builder::new()
            .name(format!("relay-{}", port.id))
            .spawn(move || crate::relay::run(vmm, framework, &name))
            .map_err(|e| failed(&e))?;
        let ended = daemon.wait();
        match relay.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(port = %port.name, error = %e, "relay ended"),
            Err(_) => warn!(port = %port.name, "the relay thread panicked"),
        }
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
