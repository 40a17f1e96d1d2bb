//! Waiting on the control plane's event loop, without blocking it, until a
//! backend's next message is whole in its socket, so that the blocking
//! reads of `iotlb_shm::backend_proto` then return at once.
//!
//! The socket itself stays blocking: message-mode subscribers share its
//! file description and send on it with a write timeout. A message is
//! known whole when the kernel holds at least its length (its header,
//! peeked, gives the length); the end of stream, a header that cannot be
//! trusted and a peer that hung up mid-message are "ready" too: the reader
//! then sees them at once.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use iotlb_shm::backend_proto::{HEADER_LEN, Message};
use tokio::io::unix::AsyncFd;

/// A backend connection watched by the event loop.
pub type Watched = AsyncFd<Arc<UnixStream>>;

/// Bytes the kernel holds for reading on `sock`.
fn queued(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the valid pointer given.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Whether the peer closed its end (or shut down its writing side).
fn hung_up(sock: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

/// Whether a whole message, or something the reader reports at once (end
/// of stream, a bad header, a hang-up mid-message), is waiting.
pub(crate) fn whole_message_queued(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let mut header = [0u8; HEADER_LEN];
    // SAFETY: recv writes at most `header.len()` bytes into `header`.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            header.as_mut_ptr().cast(),
            header.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
            _ => Ok(true),
        };
    }
    if n == 0 {
        return Ok(true);
    }
    if (n as usize) < HEADER_LEN {
        return Ok(hung_up(sock));
    }
    let Ok(total) = Message::total_len(&header) else {
        return Ok(true);
    };
    Ok(queued(sock)? >= total || hung_up(sock))
}

/// Whether anything at all (bytes or the end of stream) is waiting.
pub(crate) fn anything_queued(sock: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(queued(sock)? > 0 || hung_up(sock))
}

/// Waits until `ready` says the socket can be read without blocking.
pub async fn wait(fd: &Watched, ready: fn(BorrowedFd<'_>) -> io::Result<bool>) -> io::Result<()> {
    loop {
        let mut guard = fd.readable().await?;
        if ready(fd.get_ref().as_fd())? {
            return Ok(());
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_message_is_ready_only_when_whole() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let msg = Message::Ack { cookie: 7 }.encode();
        assert!(!whole_message_queued(b.as_fd()).unwrap(), "nothing yet");
        assert!(!anything_queued(b.as_fd()).unwrap());
        a.write_all(&msg[..5]).unwrap();
        assert!(
            !whole_message_queued(b.as_fd()).unwrap(),
            "part of a header"
        );
        assert!(anything_queued(b.as_fd()).unwrap());
        a.write_all(&msg[5..msg.len() - 1]).unwrap();
        assert!(
            !whole_message_queued(b.as_fd()).unwrap(),
            "all but one byte"
        );
        a.write_all(&msg[msg.len() - 1..]).unwrap();
        assert!(whole_message_queued(b.as_fd()).unwrap());
        drop(a);
        assert!(whole_message_queued(b.as_fd()).unwrap());
    }

    #[test]
    fn end_of_stream_bad_headers_and_hang_ups_are_ready() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(whole_message_queued(b.as_fd()).unwrap(), "end of stream");
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0xff; HEADER_LEN]).unwrap();
        assert!(whole_message_queued(b.as_fd()).unwrap(), "bad header");
        let (mut a, b) = UnixStream::pair().unwrap();
        let msg = Message::Ack { cookie: 7 }.encode();
        a.write_all(&msg[..3]).unwrap();
        drop(a);
        assert!(
            whole_message_queued(b.as_fd()).unwrap(),
            "hung up mid-header"
        );
    }
}
