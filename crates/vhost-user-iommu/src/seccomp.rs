//! The system-call filter: once the daemon's sockets are bound, every
//! thread of the process (present ones through `SECCOMP_FILTER_FLAG_TSYNC`,
//! later ones by inheritance) may make only the system calls listed here.
//! Any other call kills the whole process (`SECCOMP_RET_KILL_PROCESS`): a
//! daemon taken over through a guest request dies with SIGSYS instead of
//! doing what it never does. The kernel logs each kill (audit record
//! `type=SECCOMP`, or a `audit: … sig=31` line in the kernel log).
//!
//! The list was gathered from `strace -f -c` of the integration tests, the
//! real-guest test and the request-path benchmark, and extended for the
//! control plane (tokio, the metrics listener, the admin socket) and state
//! files. To extend it: add the call to the group that needs it, with the
//! reason in that group's comment; an integration test that makes the new
//! call under the default filter (`--seccomp on`) proves it.
//!
//! io_uring operations are not system calls: what the kick loop submits on
//! its ring is not filtered here (it only reads its kick eventfd).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// The environment variable of the self-test hook: set to `1`, the daemon
/// makes one forbidden system call (`reboot` with an invalid magic number,
/// harmless when it is let through) right after installing the filter. The
/// tests use it to prove the filter kills; an operator can use it to see
/// how a kill shows (exit by SIGSYS, an audit record).
pub const SELFTEST_ENV: &str = "VHOST_USER_IOMMU_SECCOMP_SELFTEST";

/// Why the filter is not in place.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled to BPF.
    #[error("cannot build the system-call filter")]
    Build(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the system-call filter (run with --seccomp off to debug)")]
    Install(#[source] seccompiler::Error),
    /// No filter is written for this CPU architecture.
    #[error("no system-call filter for this architecture (run with --seccomp off)")]
    Architecture,
}

/// Calls allowed whatever their arguments, each group with why.
fn unconditional() -> Vec<(&'static str, Vec<i64>)> {
    vec![
        (
            // Reading and writing sockets, eventfds, memfds, stderr.
            "I/O on descriptors the daemon holds",
            vec![
                libc::SYS_read,
                libc::SYS_write,
                libc::SYS_readv,
                libc::SYS_writev,
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_close,
                libc::SYS_close_range,
                libc::SYS_dup,
                libc::SYS_dup3,
                libc::SYS_fcntl,
                libc::SYS_lseek,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_statx,
                libc::SYS_fstatfs,
            ],
        ),
        (
            // Guest RAM (the VMM's memfds) mapped per memory table and
            // unmapped on the next; the shared table's memfds created,
            // sized and sealed; allocator and thread stacks.
            "memory: guest RAM, the shared table, the allocator",
            vec![
                libc::SYS_munmap,
                libc::SYS_mremap,
                libc::SYS_madvise,
                libc::SYS_brk,
                libc::SYS_memfd_create,
                libc::SYS_ftruncate,
                libc::SYS_fallocate,
                libc::SYS_membarrier,
                // The state journal is a mapped file (--state-dir).
                libc::SYS_msync,
            ],
        ),
        (
            // The vhost-user threads, the request thread, the backend
            // socket, the signal thread; Mutex/Condvar/park; sleeps.
            "threads, locks and time",
            vec![
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_futex,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_sched_yield,
                libc::SYS_sched_getaffinity,
                libc::SYS_sched_setaffinity,
                libc::SYS_gettid,
                libc::SYS_getpid,
                libc::SYS_exit,
                libc::SYS_exit_group,
                libc::SYS_nanosleep,
                libc::SYS_clock_nanosleep,
                libc::SYS_clock_gettime,
                libc::SYS_clock_getres,
                libc::SYS_gettimeofday,
                libc::SYS_getrandom,
                libc::SYS_sigaltstack,
                libc::SYS_rt_sigaction,
                libc::SYS_rt_sigprocmask,
                libc::SYS_rt_sigreturn,
                libc::SYS_rt_sigtimedwait,
            ],
        ),
        (
            // vhost-user-backend's epoll loop, the kick loop's io_uring,
            // eventfds for kicks, calls and fault wake-ups; tokio's reactor.
            "event loops",
            vec![
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_pwait2,
                libc::SYS_ppoll,
                libc::SYS_pselect6,
                libc::SYS_eventfd2,
                libc::SYS_pipe2,
                libc::SYS_io_uring_setup,
                libc::SYS_io_uring_enter,
                libc::SYS_io_uring_register,
            ],
        ),
        (
            // The VMM and backend sockets (accept, SCM_RIGHTS, peer
            // credentials), the admin socket, the metrics listener,
            // sock_diag queries, sd_notify's datagram.
            "sockets",
            vec![
                libc::SYS_socketpair,
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_sendmsg,
                libc::SYS_recvmsg,
                libc::SYS_sendto,
                libc::SYS_recvfrom,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_setsockopt,
                libc::SYS_getsockname,
                libc::SYS_getpeername,
            ],
        ),
        (
            // Backends' liveness and the stall policy's kill go through
            // pidfds only: no plain kill(2).
            "backend processes",
            vec![
                libc::SYS_pidfd_open,
                libc::SYS_pidfd_send_signal,
                libc::SYS_getuid,
                libc::SYS_geteuid,
                libc::SYS_getgid,
                libc::SYS_getegid,
            ],
        ),
        (
            // What the control plane may read about the process for its
            // status and metrics (CPU time, the kernel's name).
            "process information",
            vec![libc::SYS_getrusage, libc::SYS_uname],
        ),
        (
            // State files under --state-dir written as a temporary file,
            // synced, then renamed over the old one; socket files removed
            // at exit; /proc read for self-inspection.
            "files: state, sockets, /proc",
            vec![
                libc::SYS_openat,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_unlinkat,
                libc::SYS_mkdirat,
                libc::SYS_getdents64,
                libc::SYS_readlinkat,
                libc::SYS_fchmod,
                libc::SYS_fchmodat,
                // A socket file given a group (--socket-group, the admin
                // socket) when it is bound after the filter.
                libc::SYS_fchown,
                libc::SYS_fchownat,
                libc::SYS_flock,
            ],
        ),
        #[cfg(target_arch = "x86_64")]
        (
            // The x86-64 forms of calls above that glibc and std still use
            // there (aarch64 has only the newer forms).
            "x86-64 legacy forms",
            vec![
                libc::SYS_poll,
                libc::SYS_epoll_wait,
                libc::SYS_dup2,
                libc::SYS_accept,
                libc::SYS_open,
                libc::SYS_stat,
                libc::SYS_lstat,
                libc::SYS_unlink,
                libc::SYS_rename,
                libc::SYS_mkdir,
                libc::SYS_rmdir,
                libc::SYS_chmod,
                libc::SYS_chown,
                libc::SYS_lchown,
                libc::SYS_getrlimit,
                libc::SYS_readlink,
                libc::SYS_pipe,
                libc::SYS_eventfd,
            ],
        ),
    ]
}

/// A condition on an `int`-sized argument (its low 32 bits).
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    condition(index, SeccompCmpArgLen::Dword, op, value)
}

/// A condition on a pointer or other 64-bit argument.
fn arg64(index: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    condition(index, SeccompCmpArgLen::Qword, op, value)
}

fn condition(index: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    #[allow(clippy::expect_used)]
    // Only an argument index above 5 is refused; these are 0..=2.
    SeccompCondition::new(index, len, op, value).expect("argument index below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    #[allow(clippy::expect_used)]
    // Only an empty condition list is refused; every caller gives one.
    SeccompRule::new(conditions).expect("at least one condition")
}

/// Calls allowed only with some arguments: each is cheap to check and
/// shuts a door the daemon never uses.
fn conditional(pid: u32) -> Vec<(i64, Vec<SeccompRule>)> {
    use SeccompCmpOp::{Eq, MaskedEq};
    let no_exec = |index| arg(index, MaskedEq(libc::PROT_EXEC as u64), 0);
    vec![
        // Unix sockets (VMM, backends, admin, sd_notify), TCP for the
        // metrics listener, and netlink only for sock_diag (who else holds
        // a backend's socket).
        (
            libc::SYS_socket,
            vec![
                rule(vec![arg(0, Eq, libc::AF_UNIX as u64)]),
                rule(vec![arg(0, Eq, libc::AF_INET as u64)]),
                rule(vec![arg(0, Eq, libc::AF_INET6 as u64)]),
                rule(vec![
                    arg(0, Eq, libc::AF_NETLINK as u64),
                    arg(2, Eq, libc::NETLINK_SOCK_DIAG as u64),
                ]),
            ],
        ),
        // Never executable memory (what MemoryDenyWriteExecute= asks of
        // systemd, enforced here too).
        (libc::SYS_mmap, vec![rule(vec![no_exec(2)])]),
        (libc::SYS_mprotect, vec![rule(vec![no_exec(2)])]),
        // Thread names, and nothing else prctl can do.
        (
            libc::SYS_prctl,
            vec![
                rule(vec![arg(0, Eq, libc::PR_SET_NAME as u64)]),
                rule(vec![arg(0, Eq, libc::PR_GET_NAME as u64)]),
            ],
        ),
        // Resource limits read (the open-files metric), never set.
        (libc::SYS_prlimit64, vec![rule(vec![arg64(2, Eq, 0)])]),
        // Signals only to the daemon's own threads (abort, a panic).
        (
            libc::SYS_tgkill,
            vec![rule(vec![arg(0, Eq, u64::from(pid))])],
        ),
        // The descriptor ioctls std and tokio use (non-blocking and
        // close-on-exec flags, bytes waiting) and the terminal query of
        // the log's colour detection.
        (
            libc::SYS_ioctl,
            [
                libc::FIONBIO,
                libc::FIOCLEX,
                libc::FIONCLEX,
                libc::FIONREAD,
                libc::TCGETS,
                libc::TIOCGWINSZ,
            ]
            .into_iter()
            // The request type is not u64 on every libc.
            .map(|request| {
                #[allow(clippy::unnecessary_cast)]
                let request = request as u64;
                rule(vec![arg(1, Eq, request)])
            })
            .collect(),
        ),
    ]
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else if cfg!(target_arch = "riscv64") {
        Ok(TargetArch::riscv64)
    } else {
        Err(SeccompError::Architecture)
    }
}

/// The filter as BPF, for this process (`tgkill` is allowed to `pid` only).
pub(crate) fn program(pid: u32) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, calls) in unconditional() {
        for nr in calls {
            rules.insert(nr, Vec::new());
        }
    }
    for (nr, conditions) in conditional(pid) {
        rules.insert(nr, conditions);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        target_arch()?,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Build)
}

/// Installs the filter on every thread of the process, unless `enabled`
/// is false; then runs the self-test if [`SELFTEST_ENV`] asks for it.
pub(crate) fn install(enabled: bool) -> Result<(), SeccompError> {
    if enabled {
        let program = program(std::process::id())?;
        seccompiler::apply_filter_all_threads(&program).map_err(SeccompError::Install)?;
        tracing::info!(
            "system-call filter installed on every thread (a forbidden call kills the daemon with SIGSYS)"
        );
    } else {
        tracing::warn!("--seccomp off: the daemon runs without its system-call filter");
    }
    if std::env::var_os(SELFTEST_ENV).is_some_and(|v| v == "1") {
        selftest();
    }
    Ok(())
}

/// Makes a call the filter forbids: with the filter the process dies here.
fn selftest() {
    tracing::warn!("{SELFTEST_ENV}=1: making a forbidden system call (reboot)");
    // SAFETY: reboot(2) with magic numbers that are not the kernel's:
    // without the filter it fails with EINVAL (or EPERM without
    // CAP_SYS_BOOT) and changes nothing.
    let rc = unsafe { libc::syscall(libc::SYS_reboot, 0, 0, 0, 0) };
    tracing::warn!(
        rc,
        error = %std::io::Error::last_os_error(),
        "the forbidden call returned: no filter is installed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_lists_no_call_twice() {
        let mut seen = std::collections::BTreeSet::new();
        for (group, calls) in unconditional() {
            for nr in calls {
                assert!(seen.insert(nr), "{nr} listed twice (group {group})");
            }
        }
        for (nr, _) in conditional(1) {
            assert!(seen.insert(nr), "{nr} both conditional and not");
        }
        let program = program(1).unwrap();
        assert!(!program.is_empty());
    }

    /// An argument standing for the address of a zeroed buffer.
    const BUF: u64 = u64::MAX;

    /// Makes the system call `nr` with `args` in a forked child under the
    /// filter: `Ok(0)` if it succeeded, `Ok(1)` if it failed, `Err(signal)`
    /// if the child was killed.
    fn in_filtered_child(nr: i64, args: [u64; 6]) -> Result<i32, i32> {
        let program = program(std::process::id()).unwrap();
        let mut buf = [0u64; 16];
        let args = args.map(|a| if a == BUF { buf.as_mut_ptr() as u64 } else { a });
        // SAFETY: the child makes only system calls (no allocation, no
        // lock) and leaves with _exit; each call gets plain values or the
        // address of `buf`, large enough for what it writes.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let code = match seccompiler::apply_filter(&program) {
                    Ok(()) => i32::from(
                        libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) < 0,
                    ),
                    Err(_) => 100,
                };
                libc::_exit(code);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            if libc::WIFSIGNALED(status) {
                Err(libc::WTERMSIG(status))
            } else {
                Ok(libc::WEXITSTATUS(status))
            }
        }
    }

    #[test]
    fn arguments_the_daemon_never_passes_kill_and_those_it_passes_do_not() {
        let n = |v: i32| v as u64;
        let rw = n(libc::PROT_READ | libc::PROT_WRITE);
        let rx = n(libc::PROT_READ | libc::PROT_EXEC);
        // Anonymous mappings: Linux ignores the descriptor (0 below).
        let anon = n(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
        let allowed: [(&str, i64, [u64; 6]); 5] = [
            (
                "unix socket",
                libc::SYS_socket,
                [n(libc::AF_UNIX), n(libc::SOCK_STREAM), 0, 0, 0, 0],
            ),
            (
                "sock_diag",
                libc::SYS_socket,
                [
                    n(libc::AF_NETLINK),
                    n(libc::SOCK_DGRAM),
                    n(libc::NETLINK_SOCK_DIAG),
                    0,
                    0,
                    0,
                ],
            ),
            ("rw memory", libc::SYS_mmap, [0, 4096, rw, anon, 0, 0]),
            (
                "read a limit",
                libc::SYS_prlimit64,
                [0, n(libc::RLIMIT_NOFILE as i32), 0, BUF, 0, 0],
            ),
            (
                "thread name",
                libc::SYS_prctl,
                [n(libc::PR_SET_NAME), BUF, 0, 0, 0, 0],
            ),
        ];
        for (what, nr, args) in allowed {
            assert_eq!(in_filtered_child(nr, args), Ok(0), "{what}");
        }
        let forbidden: [(&str, i64, [u64; 6]); 8] = [
            (
                "packet socket",
                libc::SYS_socket,
                [n(libc::AF_PACKET), n(libc::SOCK_RAW), 0, 0, 0, 0],
            ),
            (
                "route netlink",
                libc::SYS_socket,
                [n(libc::AF_NETLINK), n(libc::SOCK_DGRAM), 0, 0, 0, 0],
            ),
            (
                "executable memory",
                libc::SYS_mmap,
                [0, 4096, rx, anon, 0, 0],
            ),
            (
                "set a limit",
                libc::SYS_prlimit64,
                [0, n(libc::RLIMIT_CORE as i32), BUF, 0, 0, 0],
            ),
            (
                "prctl",
                libc::SYS_prctl,
                [n(libc::PR_SET_DUMPABLE), 1, 0, 0, 0, 0],
            ),
            (
                "another process's thread",
                libc::SYS_tgkill,
                [1, 1, 0, 0, 0, 0],
            ),
            (
                "terminal injection",
                libc::SYS_ioctl,
                [0, u64::from(libc::TIOCSTI as u32), BUF, 0, 0, 0],
            ),
            ("kill", libc::SYS_kill, [1, 0, 0, 0, 0, 0]),
        ];
        for (what, nr, args) in forbidden {
            assert_eq!(in_filtered_child(nr, args), Err(libc::SIGSYS), "{what}");
        }
    }

    #[test]
    fn what_a_compromised_daemon_would_do_is_not_listed() {
        let all: Vec<i64> = unconditional().into_iter().flat_map(|(_, c)| c).collect();
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_reboot,
            libc::SYS_setuid,
            libc::SYS_init_module,
            libc::SYS_bpf,
            libc::SYS_socket,
        ] {
            assert!(!all.contains(&forbidden), "{forbidden} allowed");
        }
    }
}
