//! The control plane: the backend socket, the admin socket and the metrics
//! endpoint, served by one current-thread tokio runtime on a thread of its
//! own. Answers that
//! need the device or table locks (which a grace period may hold) run on
//! the runtime's small blocking pool, so a slow grace period never stalls
//! the event loop. The request queue stays on its own io_uring thread.

use std::io;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::admin::DaemonView;
use crate::admin_proto::{AdminReply, AdminRequest, MAX_REQUEST_LEN};

/// Threads the blocking pool may use (admin answers, scrapes, and backend
/// steps that take the table or device lock, which a grace period holds);
/// they are started on demand and end when idle.
const BLOCKING_THREADS: usize = 16;
/// Admin connections served at once; more are closed at once.
const MAX_ADMIN_CONNECTIONS: usize = 16;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The admin socket cannot be bound.
    #[error("cannot listen for admin commands on {0}")]
    AdminSocket(
        String,
        #[source] vhost_user_process::socket_file::SocketFileError,
    ),
    /// The metrics address cannot be bound.
    #[error("cannot serve metrics on {0}")]
    Metrics(String, #[source] io::Error),
    /// The runtime or its thread cannot be created.
    #[error("cannot start the control-plane thread")]
    Runtime(#[source] io::Error),
}

/// Where the control plane listens.
#[derive(Debug, Default)]
pub struct ControlSettings<'a> {
    /// The admin socket's path.
    pub admin_socket: Option<&'a Path>,
    /// The metrics address.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Binds what `settings` asks for (so that errors are reported before the
/// daemon serves) and starts the control-plane thread, which also serves
/// `backends` (already bound). Does nothing when there is nothing to serve.
pub(crate) fn start(
    settings: ControlSettings<'_>,
    view: DaemonView,
    backends: Option<crate::backend_socket::BackendSocket>,
) -> Result<(), ControlError> {
    let admin = match settings.admin_socket {
        Some(path) => Some(
            vhost_user_process::socket_file::bind(
                path,
                vhost_user_process::socket_file::Permissions {
                    mode: Some(0o600),
                    group: None,
                },
            )
            .map_err(|e| ControlError::AdminSocket(path.display().to_string(), e))?,
        ),
        None => None,
    };
    let metrics = match settings.metrics_addr {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| ControlError::Metrics(addr.to_string(), e))?,
        ),
        None => None,
    };
    if admin.is_none() && metrics.is_none() && backends.is_none() {
        return Ok(());
    }
    if let Some(l) = &admin {
        l.set_nonblocking(true).map_err(ControlError::Runtime)?;
    }
    if let Some(l) = &metrics {
        l.set_nonblocking(true).map_err(ControlError::Runtime)?;
        if let Ok(addr) = l.local_addr() {
            info!(%addr, "metrics at http://{addr}/metrics");
        }
    }
    if let Some(path) = settings.admin_socket {
        info!(admin_socket = %path.display(), "admin socket ready (viommu-ctl --admin-socket)");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_name("control-blocking")
        .build()
        .map_err(ControlError::Runtime)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || runtime.block_on(run(admin, metrics, backends, view)))
        .map_err(ControlError::Runtime)?;
    Ok(())
}

async fn run(
    admin: Option<StdUnixListener>,
    metrics: Option<std::net::TcpListener>,
    backends: Option<crate::backend_socket::BackendSocket>,
    view: DaemonView,
) {
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(b) = backends {
        tasks.spawn(b.run());
    }
    if let Some(l) = metrics {
        match tokio::net::TcpListener::from_std(l) {
            Ok(l) => {
                tasks.spawn(crate::http::serve(l, view.clone()));
            }
            Err(e) => warn!(error = %e, "cannot serve metrics"),
        }
    }
    if let Some(l) = admin {
        match UnixListener::from_std(l) {
            Ok(l) => {
                tasks.spawn(serve_admin(l, view));
            }
            Err(e) => warn!(error = %e, "cannot serve the admin socket"),
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn serve_admin(listener: UnixListener, view: DaemonView) {
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = std::sync::Arc::clone(&open).try_acquire_owned() else {
            debug!("admin connection refused: {MAX_ADMIN_CONNECTIONS} already open");
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            if let Err(e) = admin_connection(stream, view).await {
                debug!(error = %e, "admin connection ended");
            }
            drop(permit);
        });
    }
}

fn refusal(error: String) -> AdminReply {
    AdminReply {
        ok: false,
        data: None,
        error: Some(error),
    }
}

/// One reply line.
fn reply_line(reply: &AdminReply) -> Vec<u8> {
    let mut line = serde_json::to_vec(reply).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"error\":\"cannot encode the reply: {e}\"}}").into_bytes()
    });
    line.push(b'\n');
    line
}

/// Serves one admin connection: a reply line per request line, until the
/// client closes it or sends a line longer than [`MAX_REQUEST_LEN`].
async fn admin_connection(stream: UnixStream, view: DaemonView) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut read)
            .take(MAX_REQUEST_LEN as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let reply = if line.len() > MAX_REQUEST_LEN {
                refusal(format!(
                    "request longer than {MAX_REQUEST_LEN} bytes; connection closed"
                ))
            } else {
                refusal("request not ended by a newline; connection closed".into())
            };
            write.write_all(&reply_line(&reply)).await?;
            return Ok(());
        }
        let reply = match serde_json::from_slice::<AdminRequest>(&line) {
            Ok(request) => {
                debug!(?request, "admin command");
                let view = view.clone();
                tokio::task::spawn_blocking(move || view.answer(request))
                    .await
                    .unwrap_or_else(|e| refusal(format!("the command failed: {e}")))
            }
            Err(e) => refusal(format!("malformed request: {e}")),
        };
        write.write_all(&reply_line(&reply)).await?;
    }
}
