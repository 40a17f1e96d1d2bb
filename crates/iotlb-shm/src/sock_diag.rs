//! How much a TCP socket still holds in its send path, asked of the kernel
//! with a `sock_diag` netlink request (what `ss -m` shows). It works on a
//! socket nobody has a descriptor of any more: a closed socket with data
//! still queued lives on in the kernel (orphaned) until the data is sent and
//! acknowledged, and its queued pages are what zero-copy sends left behind.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A TCP connection, named as the kernel's socket lookup wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEndpoints {
    /// Its local address.
    pub local: SocketAddr,
    /// Its peer's address.
    pub peer: SocketAddr,
    /// `SO_COOKIE`: unique for the life of the machine, so a later socket
    /// that reuses the addresses is never mistaken for this one.
    pub cookie: u64,
}

/// What the send path of a socket holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPath {
    /// The socket has no queue any more: destroyed, replaced by a
    /// TIME-WAIT entry, or its addresses reused by another socket.
    Gone,
    /// The socket exists with these bytes charged to its send path.
    Holding {
        /// Packets not yet acknowledged (the write and retransmit queues).
        queued: u32,
        /// Packet copies still in the stack below TCP (qdisc, driver).
        in_flight: u32,
    },
}

impl SendPath {
    /// Whether no page the socket was given can still be read by it.
    pub fn drained(self) -> bool {
        matches!(
            self,
            SendPath::Gone
                | SendPath::Holding {
                    queued: 0,
                    in_flight: 0
                }
        )
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HEADER: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;
/// `INET_DIAG_SKMEMINFO`: an array of `SK_MEMINFO_*` counters.
const INET_DIAG_SKMEMINFO: u16 = 7;
const SK_MEMINFO_WMEM_ALLOC: usize = 2;
const SK_MEMINFO_WMEM_QUEUED: usize = 5;

/// Asks the kernel about `tcp`.
pub fn tcp_send_path(tcp: &TcpEndpoints) -> io::Result<SendPath> {
    let request = request(tcp)?;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval from the pointer given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: an all-zero sockaddr_nl addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the buffer and the address are live for the call.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 4096];
    let n = loop {
        // SAFETY: `reply` is writable for its whole length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    parse(&reply[..n])
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

/// The request for exactly `tcp`, asking for its memory counters.
fn request(tcp: &TcpEndpoints) -> io::Result<[u8; NLMSG_HEADER + REQ_LEN]> {
    let family = match (tcp.local, tcp.peer) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => libc::AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => libc::AF_INET6,
        _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
    };
    let mut b = [0u8; NLMSG_HEADER + REQ_LEN];
    put(&mut b, 0, &((NLMSG_HEADER + REQ_LEN) as u32).to_ne_bytes());
    put(&mut b, 4, &SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    put(&mut b, 6, &(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    let r = NLMSG_HEADER;
    b[r] = family as u8;
    b[r + 1] = libc::IPPROTO_TCP as u8;
    b[r + 2] = 1 << (INET_DIAG_SKMEMINFO - 1);
    put(&mut b, r + 4, &u32::MAX.to_ne_bytes()); // every state
    let id = r + 8;
    put(&mut b, id, &tcp.local.port().to_be_bytes());
    put(&mut b, id + 2, &tcp.peer.port().to_be_bytes());
    put(&mut b, id + 4, &addr_bytes(tcp.local.ip()));
    put(&mut b, id + 20, &addr_bytes(tcp.peer.ip()));
    put(&mut b, id + 40, &(tcp.cookie as u32).to_ne_bytes());
    put(&mut b, id + 44, &((tcp.cookie >> 32) as u32).to_ne_bytes());
    Ok(b)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse(reply: &[u8]) -> io::Result<SendPath> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    let len = (u32_at(reply, 0).ok_or_else(bad)? as usize).min(reply.len());
    let kind = u16_at(reply, 4).ok_or_else(bad)?;
    if kind == NLMSG_ERROR {
        let errno = -(u32_at(reply, NLMSG_HEADER).ok_or_else(bad)? as i32);
        return match errno {
            // No such socket, or another one now has its addresses.
            libc::ENOENT | libc::ESTALE => Ok(SendPath::Gone),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY || len < NLMSG_HEADER + MSG_LEN {
        return Err(bad());
    }
    let mut at = NLMSG_HEADER + MSG_LEN;
    while at + 4 <= len {
        let attr_len = u16_at(reply, at).ok_or_else(bad)? as usize;
        let attr_type = u16_at(reply, at + 2).ok_or_else(bad)?;
        if attr_len < 4 || at + attr_len > len {
            return Err(bad());
        }
        if attr_type == INET_DIAG_SKMEMINFO {
            let word = |i: usize| u32_at(reply, at + 4 + 4 * i).ok_or_else(bad);
            return Ok(SendPath::Holding {
                queued: word(SK_MEMINFO_WMEM_QUEUED)?,
                in_flight: word(SK_MEMINFO_WMEM_ALLOC)?,
            });
        }
        at += (attr_len + 3) & !3;
    }
    // A TIME-WAIT entry has no memory counters: it holds no data.
    Ok(SendPath::Gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn endpoints(s: &std::net::TcpStream) -> TcpEndpoints {
        TcpEndpoints {
            local: s.local_addr().unwrap(),
            peer: s.peer_addr().unwrap(),
            cookie: crate::drain::socket_cookie(s.as_fd()).unwrap(),
        }
    }

    #[test]
    fn a_socket_with_unread_data_holds_it_until_the_peer_reads() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (receiver, _) = listener.accept().unwrap();
        let tcp = endpoints(&sender);
        assert_eq!(
            tcp_send_path(&tcp).unwrap(),
            SendPath::Holding {
                queued: 0,
                in_flight: 0
            }
        );
        // Far more than the receiver's buffer: the rest stays queued here.
        sender.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..16 {
            if sender.write(&chunk).is_err() {
                break;
            }
        }
        let held = tcp_send_path(&tcp).unwrap();
        assert!(!held.drained(), "{held:?}");
        let other = TcpEndpoints {
            cookie: tcp.cookie ^ 1,
            ..tcp
        };
        assert_eq!(
            tcp_send_path(&other).unwrap(),
            SendPath::Gone,
            "another socket's cookie never matches"
        );
        drop(receiver); // the peer resets: the queue is purged
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !tcp_send_path(&tcp).unwrap().drained() {
            assert!(std::time::Instant::now() < deadline, "never drained");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
