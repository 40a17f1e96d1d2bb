//! The daemon hardened as deployed: its system-call filter kills it on a
//! forbidden call and lets a whole workload through, and it serves a socket
//! handed over by systemd socket activation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use viommu_frontend::replay::{map_unmap_stream, replay_pipelined};
use viommu_frontend::{Driver, DriverOptions};

/// The documented test hook (docs/operations.md).
const SELFTEST_ENV: &str = "VHOST_USER_IOMMU_SECCOMP_SELFTEST";

fn wait(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Each live thread's name and `Seccomp:` mode from /proc (2: a filter).
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        // A thread may end between the listing and the read: skip it.
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("status")),
        ) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        modes.push((comm.trim().to_string(), mode));
    }
    modes
}

/// Replays MAP/UNMAP pairs, all OK; returns the still connected driver.
fn replay_map_unmap(socket: &Path) -> Driver {
    let requests = map_unmap_stream(4, 2_000, 32);
    let mut drv = Driver::connect(socket, DriverOptions::default()).unwrap();
    let report = replay_pipelined(&mut drv, &requests, 32, 4).unwrap();
    assert_eq!(report.requests, requests.len() as u64);
    assert_eq!(report.non_ok, 0, "{report}");
    drv
}

#[test]
fn a_forbidden_system_call_kills_the_daemon_with_sigsys() {
    let dir = scratch_dir("seccomp-kill");
    let sock = dir.join("viommu.sock");
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut child = Command::new(daemon_bin())
        .arg("--socket-path")
        .arg(&sock)
        .env(SELFTEST_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let status = wait(&mut child, Duration::from_secs(10)).expect("the daemon dies");
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}; log:\n{log}");
    assert!(log.contains("making a forbidden system call"), "{log}");
    assert!(!log.contains("the forbidden call returned"), "{log}");
}

#[test]
fn seccomp_off_lets_the_forbidden_call_through_and_the_daemon_serves() {
    let dir = scratch_dir("seccomp-off");
    let sock = dir.join("viommu.sock");
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut child = Command::new(daemon_bin())
        .arg("--socket-path")
        .arg(&sock)
        .args(["--seccomp", "off"])
        .env(SELFTEST_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(dir.join("daemon.log"))
        .unwrap()
        .contains("the forbidden call returned")
    {
        assert!(Instant::now() < deadline, "no self-test line");
        assert!(child.try_wait().unwrap().is_none(), "the daemon died");
        std::thread::sleep(Duration::from_millis(5));
    }
    replay_map_unmap(&sock);
    let modes = seccomp_modes(child.id());
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The default: every thread, those started before the filter and those
/// started for the VMM after it, runs under the filter, and a workload
/// with backends, the table and the kick loop goes through it.
#[test]
fn every_thread_runs_under_the_filter_through_a_replay() {
    let dir = scratch_dir("seccomp-on");
    let backends = dir.join("backends.sock");
    let d = Daemon::spawn(
        &dir.join("viommu.sock"),
        &["--backend-socket", backends.to_str().unwrap()],
    );
    let drv = replay_map_unmap(&d.socket);
    // While the VMM is connected: its threads are there too.
    let modes = seccomp_modes(d.child.id());
    drop(drv);
    assert!(modes.len() >= 3, "{modes:?}");
    assert!(modes.iter().all(|(_, m)| m == "2"), "{modes:?}");
    assert!(
        modes.iter().any(|(c, _)| c == "requestq"),
        "the request thread, started after the filter: {modes:?}"
    );
}

/// Starts the daemon with `listener` as descriptor 3 and the variables
/// systemd sets (`LISTEN_PID` is the daemon's own pid, known only in the
/// child).
fn spawn_activated(listener: &UnixListener, dir: &Path, args: &[&str], pid_for_us: bool) -> Child {
    let fd = listener.as_raw_fd();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut cmd = Command::new(daemon_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: between fork and exec the child only moves a descriptor to 3
    // and sets two environment variables (glibc's allocator is fork-safe);
    // the command sets no environment of its own, so the exec keeps these.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, 3) == 3
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            let pid = if pid_for_us { libc::getpid() } else { 1 };
            let pid = std::ffi::CString::new(pid.to_string()).unwrap_or_default();
            libc::setenv(c"LISTEN_PID".as_ptr(), pid.as_ptr(), 1);
            libc::setenv(c"LISTEN_FDS".as_ptr(), c"1".as_ptr(), 1);
            libc::setenv(c"LISTEN_FDNAMES".as_ptr(), c"vmm".as_ptr(), 1);
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn a_socket_activated_daemon_serves_the_socket_systemd_passed() {
    let dir = scratch_dir("activation");
    // As the shipped unit runs it (`--fd 3`) and with no socket option.
    for args in [&["--fd", "3"][..], &[][..]] {
        let path = dir.join("activated.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let mut child = spawn_activated(&listener, &dir, args, true);
        drop(listener);
        replay_map_unmap(&path);
        assert!(child.try_wait().unwrap().is_none(), "still serving");
        // The socket is systemd's: the daemon does not remove it on exit.
        // SAFETY: kill() on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = wait(&mut child, Duration::from_secs(5)).expect("exits");
        assert!(status.success(), "{status}");
        assert!(path.exists(), "{args:?}: the socket unit's file is left");
    }
}

#[test]
fn descriptors_passed_to_another_process_are_not_taken() {
    let dir = scratch_dir("activation-other");
    let path = dir.join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // LISTEN_PID names another process: without a socket option the
    // daemon refuses to start rather than serve fd 3.
    let mut child = spawn_activated(&listener, &dir, &[], false);
    let status = wait(&mut child, Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(2), "{status}");
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
    assert!(log.contains("--socket-path"), "{log}");
}
