//! A minimal HTTP/1.1 server for one resource: `GET /metrics` (and `HEAD`).
//! Anything else is 404 (another path) or 405 (another method); a request
//! head that is malformed, longer than [`MAX_HEAD`] or slower than
//! [`HEAD_TIMEOUT`] is answered 400 or dropped. Each response closes its
//! connection. A web framework would not earn its place for this.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::admin::DaemonView;
use crate::metrics::{self, MetricsSnapshot};

/// Longest request head read.
pub const MAX_HEAD: usize = 8192;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 16;

/// What a request head asks.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// `GET /metrics` (`head`: a HEAD request, no body).
    Metrics {
        /// A HEAD request.
        head: bool,
    },
    /// Another path.
    NotFound,
    /// Another method.
    BadMethod,
    /// Not an HTTP/1.x request line.
    Malformed,
}

/// Reads a request head's first line.
pub(crate) fn parse_request_line(head: &[u8]) -> Asked {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Asked::Malformed;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Asked::Malformed;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Asked::Malformed;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Asked::Malformed;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Asked::Metrics {
            head: method == "HEAD",
        },
        ("GET" | "HEAD", _) => Asked::NotFound,
        _ => Asked::BadMethod,
    }
}

/// Serves `listener` forever.
pub async fn serve(listener: TcpListener, view: DaemonView) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let view = view.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, view).await {
                        debug!(%peer, error = %e, "metrics connection failed");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(head))
}

async fn answer(mut stream: TcpStream, view: DaemonView) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let asked = head.as_deref().map_or(Asked::Malformed, parse_request_line);
    let (status, body, content_type, no_body) = match asked {
        Asked::Metrics { head } => {
            let rendered =
                tokio::task::spawn_blocking(move || metrics::render(MetricsSnapshot::take(&view)))
                    .await;
            match rendered {
                Ok(Ok(text)) => ("200 OK", text, metrics::CONTENT_TYPE, head),
                _ => (
                    "500 Internal Server Error",
                    "cannot encode the metrics\n".into(),
                    "text/plain",
                    false,
                ),
            }
        }
        Asked::NotFound => (
            "404 Not Found",
            "only /metrics is here\n".into(),
            "text/plain",
            false,
        ),
        Asked::BadMethod => (
            "405 Method Not Allowed",
            "GET only\n".into(),
            "text/plain",
            false,
        ),
        Asked::Malformed => (
            "400 Bad Request",
            "bad request\n".into(),
            "text/plain",
            false,
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" },
    )
    .into_bytes();
    if !no_body {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics { head: false }
        );
        assert_eq!(
            parse_request_line(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Asked::Metrics { head: true }
        );
        assert_eq!(
            parse_request_line(b"GET / HTTP/1.1\r\n\r\n"),
            Asked::NotFound
        );
        assert_eq!(
            parse_request_line(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Asked::NotFound
        );
        assert_eq!(
            parse_request_line(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::BadMethod
        );
        assert_eq!(
            parse_request_line(b"GET /metrics\r\n\r\n"),
            Asked::Malformed
        );
        assert_eq!(
            parse_request_line(b"GET metrics HTTP/1.1\r\n\r\n"),
            Asked::Malformed
        );
        assert_eq!(
            parse_request_line(b"GET /metrics SPDY/3 \r\n\r\n"),
            Asked::Malformed
        );
        assert_eq!(
            parse_request_line(b"\xff\xfe /metrics HTTP/1.1\r\n"),
            Asked::Malformed
        );
        assert_eq!(parse_request_line(b""), Asked::Malformed);
    }
}
