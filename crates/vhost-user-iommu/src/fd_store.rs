//! systemd's file-descriptor store: what the daemon keeps there so that
//! the daemon started after it — by `Restart=on-failure`, or by
//! `systemctl restart` with `FileDescriptorStorePreserve=yes` — can wait
//! exactly for the backends of this one.
//!
//! For every backend connection the daemon stores, under names that start
//! with `backend-PID-ID-` (ID: its reader ID, unique across daemons), the
//! backend's slot file (`slots`), a pidfd of its process (`pidfd`), the
//! sentinel of every io_uring it registered (`ring-N`, up to 64) and the
//! previous daemons' slot files it handed over (`previous-N`); they are
//! removed once the backend and those files are released. The next
//! daemon gets them back (`LISTEN_FDS`/`LISTEN_FDNAMES`) and registers each
//! backend as a reader of the previous table ([`CarriedBackend`]): no
//! revocation completes until the backend has retired and finished with
//! that table, closed the file, or exited with its rings drained — even
//! one that dies while no daemon runs, with I/O the kernel still does.
//! Zero-copy TCP sockets are not stored (the store would keep their
//! connections open).
//!
//! The store is used when systemd gives the daemon a notification socket
//! (`NOTIFY_SOCKET`; the shipped unit sets `NotifyAccess=main` and
//! `FileDescriptorStoreMax=`); messages are `sd_notify(3)` datagrams.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use tracing::warn;

/// The prefix of every name this daemon stores.
pub const BACKEND_PREFIX: &str = "backend-";

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub struct FdStore {
    socket: UnixDatagram,
}

impl FdStore {
    /// The store of the service manager that started this process, if it
    /// gave one (`NOTIFY_SOCKET`).
    pub fn from_env() -> Option<FdStore> {
        let address = std::env::var("NOTIFY_SOCKET").ok()?;
        match FdStore::connect(&address) {
            Ok(store) => Some(store),
            Err(e) => {
                warn!(%address, error = %e, "cannot reach systemd's notification socket; backends are not kept in its descriptor store");
                None
            }
        }
    }

    /// Connects to the notification socket at `address` (a path, or
    /// `@name` in the abstract namespace).
    pub fn connect(address: &str) -> io::Result<FdStore> {
        let socket = UnixDatagram::unbound()?;
        match address.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.connect_addr(&addr)?;
            }
            None => socket.connect(address)?,
        }
        Ok(FdStore { socket })
    }

    /// Stores `fd` under `name`.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let text = format!("FDSTORE=1\nFDNAME={name}\n");
        iotlb_shm::backend_proto::send_with_fds(self.socket.as_fd(), text.as_bytes(), &[fd])
    }

    /// Removes every descriptor stored under `name`.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let text = format!("FDSTOREREMOVE=1\nFDNAME={name}\n");
        iotlb_shm::backend_proto::send_with_fds(self.socket.as_fd(), text.as_bytes(), &[])
    }

    /// Stores `fd` under `name` and appends the name to `names`; a failure
    /// is logged (the backend then relies on the state directory's list).
    pub fn keep(&self, names: &mut Vec<String>, name: String, fd: BorrowedFd<'_>) {
        match self.store(&name, fd) {
            Ok(()) => names.push(name),
            Err(e) => {
                warn!(%name, error = %e, "cannot store a backend's descriptor in systemd's store")
            }
        }
    }

    /// Removes every name of `names` (a released backend's).
    pub fn forget(&self, names: &[String]) {
        for name in names {
            if let Err(e) = self.remove(name) {
                warn!(%name, error = %e, "cannot remove a descriptor from systemd's store");
            }
        }
    }
}

/// A number of this daemon process's own (40 bits), for what must differ
/// between a daemon and its predecessors: reader IDs are numbered from
/// `nonce << 24`, so that an ID names one connection across restarts (and
/// names in the store, which carry it, never collide).
pub fn daemon_nonce() -> u64 {
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        let mixed = (u64::from(std::process::id()) << 20)
            ^ (ts.tv_sec as u64).wrapping_mul(1_000_000_007)
            ^ ts.tv_nsec as u64;
        (mixed & ((1 << 40) - 1)).max(1)
    })
}

/// The name of the stored descriptor `what` of backend connection `id`
/// (process `pid`): `backend-PID-ID-WHAT`.
pub fn backend_name(pid: i32, id: u64, what: &str) -> String {
    format!("{BACKEND_PREFIX}{pid}-{id}-{what}")
}

/// A backend of a previous daemon, from the descriptors it stored.
#[derive(Debug)]
pub struct CarriedBackend {
    /// The process ID it had.
    pub pid: i32,
    /// Its slot file of the previous table.
    pub slots: OwnedFd,
    /// A pidfd of its process; `None` once systemd dropped it (the process
    /// is gone).
    pub pidfd: Option<OwnedFd>,
    /// Sentinels of its io_urings.
    pub rings: Vec<OwnedFd>,
    /// Slot files of earlier daemons' tables it had handed over to the
    /// daemon that stored them and was still using (a restart after a
    /// restart).
    pub previous: Vec<OwnedFd>,
    /// The names they were stored under.
    pub names: Vec<String>,
}

/// Groups the stored descriptors `passed` (name, descriptor) by backend.
/// A backend without its slot file is dropped with a warning (nothing says
/// what it holds); one without its pidfd is gone (systemd drops a pidfd
/// that hangs up); descriptors with other names are ignored.
pub fn carried_backends(passed: Vec<(String, OwnedFd)>) -> Vec<CarriedBackend> {
    #[derive(Default)]
    struct Parts {
        pid: i32,
        slots: Option<OwnedFd>,
        pidfd: Option<OwnedFd>,
        rings: Vec<OwnedFd>,
        previous: Vec<OwnedFd>,
        names: Vec<String>,
    }
    let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
    for (name, fd) in passed {
        let Some(rest) = name.strip_prefix(BACKEND_PREFIX) else {
            continue;
        };
        let mut fields = rest.splitn(3, '-');
        let (Some(pid), Some(id), Some(what)) = (fields.next(), fields.next(), fields.next())
        else {
            warn!(%name, "a stored descriptor with a name this daemon does not give; ignored");
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            warn!(%name, "a stored descriptor with a name this daemon does not give; ignored");
            continue;
        };
        let parts = groups.entry(format!("{pid}-{id}")).or_default();
        parts.pid = pid;
        match what {
            "slots" => parts.slots = Some(fd),
            "pidfd" => parts.pidfd = Some(fd),
            w if w.starts_with("ring-") => parts.rings.push(fd),
            w if w.starts_with("previous-") => parts.previous.push(fd),
            _ => {
                warn!(%name, "a stored descriptor with a name this daemon does not give; ignored");
                continue;
            }
        }
        if !parts.names.contains(&name) {
            parts.names.push(name);
        }
    }
    groups
        .into_iter()
        .filter_map(|(key, p)| match p.slots {
            Some(slots) => Some(CarriedBackend {
                pid: p.pid,
                slots,
                pidfd: p.pidfd,
                rings: p.rings,
                previous: p.previous,
                names: p.names,
            }),
            None => {
                warn!(backend = %key, "stored descriptors of a backend lack its slot file; ignored");
                None
            }
        })
        .collect()
}

/// Takes ownership of the descriptors systemd passed under names starting
/// with [`BACKEND_PREFIX`].
///
/// # Safety
///
/// Each `fd` must be an open descriptor that nothing else owns (systemd
/// passed it to this process, which has not used it otherwise).
pub unsafe fn take_passed(
    passed: &[vhost_user_process::activation::PassedFd],
) -> Vec<(String, OwnedFd)> {
    passed
        .iter()
        .filter_map(|p| {
            let name = p.name.as_deref()?;
            name.starts_with(BACKEND_PREFIX).then(|| {
                // SAFETY: the caller guarantees the descriptor is ours.
                (name.to_owned(), unsafe { OwnedFd::from_raw_fd(p.fd) })
            })
        })
        .collect()
}

/// Receives one notification datagram on `sock` (the service manager's
/// side, for tests that stand in for systemd): its text and descriptors.
pub fn recv_notification(sock: &UnixDatagram) -> io::Result<(String, Vec<OwnedFd>)> {
    use std::os::fd::AsRawFd;
    const MAX_FDS: usize = 16;
    let mut data = [0u8; 4096];
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg describes live, writable buffers of the sizes given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed headers of at
    // most msg_controllen bytes; each SCM_RIGHTS payload holds descriptors
    // now owned by this process.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c).cast::<i32>();
                for i in 0..len / 4 {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let text = String::from_utf8_lossy(&data[..n as usize]).into_owned();
    Ok((text, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
    }

    #[test]
    fn stored_descriptors_group_by_backend_and_incomplete_groups_are_dropped() {
        let passed = vec![
            (backend_name(10, 0, "slots"), fd()),
            (backend_name(10, 0, "pidfd"), fd()),
            (backend_name(10, 0, "ring-1"), fd()),
            (backend_name(10, 0, "ring-2"), fd()),
            (backend_name(11, 3, "slots"), fd()), // no pidfd: gone
            (backend_name(12, 4, "pidfd"), fd()),
            (backend_name(12, 4, "slots"), fd()),
            (backend_name(14, 6, "pidfd"), fd()), // no slot file: dropped
            ("backend-x-1-slots".into(), fd()),
            (backend_name(13, 5, "unknown"), fd()),
            ("vmm".into(), fd()),
        ];
        let got = carried_backends(passed);
        let summary: Vec<_> = got
            .iter()
            .map(|b| (b.pid, b.pidfd.is_some(), b.rings.len(), b.names.len()))
            .collect();
        assert_eq!(
            summary,
            vec![(10, true, 2, 4), (11, false, 0, 1), (12, true, 0, 2)]
        );
    }

    #[test]
    fn messages_reach_the_notification_socket_with_their_descriptor() {
        let dir = viommu_test_support::scratch::dir("viommu-fdstore", "notify");
        let path = dir.join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let store = FdStore::connect(path.to_str().unwrap()).unwrap();
        let f = fd();
        store.store("backend-1-2-slots", f.as_fd()).unwrap();
        store.remove("backend-1-2-slots").unwrap();
        let mut buf = [0u8; 256];
        let (n, fds) = recv_with_fds(&server, &mut buf);
        assert_eq!(&buf[..n], b"FDSTORE=1\nFDNAME=backend-1-2-slots\n");
        assert_eq!(fds, 1);
        let (n, fds) = recv_with_fds(&server, &mut buf);
        assert_eq!(&buf[..n], b"FDSTOREREMOVE=1\nFDNAME=backend-1-2-slots\n");
        assert_eq!(fds, 0);
    }

    fn recv_with_fds(sock: &UnixDatagram, buf: &mut [u8]) -> (usize, usize) {
        let (text, fds) = recv_notification(sock).unwrap();
        buf[..text.len()].copy_from_slice(text.as_bytes());
        (text.len(), fds.len())
    }
}
