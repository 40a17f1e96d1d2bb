//! Socket activation: listening sockets (and stored descriptors) that
//! systemd hands a service, as `sd_listen_fds(3)` reads them. The
//! descriptors start at 3; `LISTEN_FDS` says how many, `LISTEN_PID` which
//! process they are for (a child that inherited the variables must not take
//! its parent's descriptors), `LISTEN_FDNAMES` their names
//! (`FileDescriptorName=` of the socket unit, or `FDNAME=` of the store).
//! The variables are removed once read, so no child inherits them.

use std::os::fd::RawFd;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: RawFd = 3;

/// The name the VMM socket is given in the shipped `.socket` unit
/// (`FileDescriptorName=vmm`).
pub const VMM_FD_NAME: &str = "vmm";

/// One passed descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassedFd {
    /// The descriptor number.
    pub fd: RawFd,
    /// Its name, if `LISTEN_FDNAMES` gave one (`unknown` is none).
    pub name: Option<String>,
}

/// What systemd passed this process; empty when it passed nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Activation {
    /// The descriptors, from [`FIRST_FD`] on.
    pub fds: Vec<PassedFd>,
}

/// Reads the three variables as given (no environment access), for this
/// process's `pid`: nothing when `LISTEN_PID` is absent, not a number or
/// another process's, or `LISTEN_FDS` is absent or not a number.
pub fn parse(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    pid: u32,
) -> Activation {
    let for_us = listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(pid);
    let count = listen_fds.and_then(|n| n.trim().parse::<u16>().ok());
    let (true, Some(count)) = (for_us, count) else {
        return Activation::default();
    };
    let mut names = names.map(|n| n.split(':'));
    let fds = (0..RawFd::from(count))
        .map(|i| PassedFd {
            fd: FIRST_FD + i,
            name: names
                .as_mut()
                .and_then(|n| n.next())
                .filter(|n| !n.is_empty() && *n != "unknown")
                .map(str::to_owned),
        })
        .collect();
    Activation { fds }
}

impl Activation {
    /// Takes what systemd passed: reads and removes `LISTEN_PID`,
    /// `LISTEN_FDS` and `LISTEN_FDNAMES`, and marks the descriptors
    /// close-on-exec (as `sd_listen_fds(1)` does).
    ///
    /// # Safety
    ///
    /// Removes environment variables: call it while the process has one
    /// thread, before anything else reads the environment.
    pub unsafe fn take_from_env() -> Activation {
        let var = |k: &str| std::env::var(k).ok();
        let activation = parse(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        );
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: the caller guarantees no other thread runs, so no one
            // reads the environment meanwhile.
            unsafe { std::env::remove_var(k) };
        }
        for p in &activation.fds {
            // SAFETY: fcntl on a descriptor number; one that is not open
            // only makes the calls fail, which changes nothing.
            unsafe {
                let flags = libc::fcntl(p.fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(p.fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
        activation
    }

    /// The VMM's listening socket: the descriptor named [`VMM_FD_NAME`],
    /// else the first one that is a listening socket.
    pub fn vmm_socket(&self) -> Option<RawFd> {
        self.fds
            .iter()
            .find(|p| p.name.as_deref() == Some(VMM_FD_NAME))
            .or_else(|| self.fds.iter().find(|p| is_listening(p.fd)))
            .map(|p| p.fd)
    }
}

/// Whether `fd` is a socket in the listening state.
pub fn is_listening(fd: RawFd) -> bool {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`, a
    // live c_int; a descriptor that is not a socket only makes it fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && accepting != 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn descriptors_are_ours_only_when_listen_pid_is_this_process() {
        let a = parse(Some("42"), Some("2"), Some("vmm:state"), 42);
        assert_eq!(
            a.fds,
            vec![
                PassedFd {
                    fd: 3,
                    name: Some("vmm".into())
                },
                PassedFd {
                    fd: 4,
                    name: Some("state".into())
                },
            ]
        );
        assert_eq!(a.vmm_socket(), Some(3));
        // Another process's, or none named.
        assert_eq!(
            parse(Some("41"), Some("2"), None, 42),
            Activation::default()
        );
        assert_eq!(parse(None, Some("1"), None, 42), Activation::default());
        assert_eq!(parse(Some("42"), None, None, 42), Activation::default());
    }

    #[test]
    fn malformed_variables_pass_nothing() {
        for (pid, n) in [("x", "1"), ("42", "-1"), ("42", "one"), ("42", "99999999")] {
            assert_eq!(
                parse(Some(pid), Some(n), None, 42),
                Activation::default(),
                "{pid} {n}"
            );
        }
        assert_eq!(parse(Some("42"), Some("0"), None, 42).vmm_socket(), None);
    }

    #[test]
    fn unnamed_descriptors_fall_back_to_the_first_listening_one() {
        let a = parse(Some("7"), Some("1"), Some("unknown"), 7);
        assert_eq!(a.fds[0].name, None);
        // No real descriptor 3 is a listening socket in the test harness
        // for sure, so check the probe itself on sockets of our own.
        let dir = std::env::temp_dir().join(format!("vup-activation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.join("l.sock")).unwrap();
        let (a_end, _b_end) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(is_listening(listener.as_raw_fd()));
        assert!(!is_listening(a_end.as_raw_fd()));
        assert!(!is_listening(-1));
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
