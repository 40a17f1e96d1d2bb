//! The daemon as a process: conventions of QEMU's vhost-user backend
//! programs (socket, --fd, --print-capabilities, signals, errors).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn sigterm_and_sigint_exit_zero_promptly_and_remove_the_socket() {
    let dir = scratch_dir("sigterm");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let sock = dir.join(format!("s{sig}.sock"));
        let mut d = Daemon::spawn(&sock, &[]);
        d.signal(sig);
        let status = d
            .wait_exit(Duration::from_secs(1))
            .expect("exits within a second");
        assert!(status.success(), "{status}");
        assert!(!sock.exists(), "socket file removed");
    }
}

/// stderr a pipe whose reader has gone: logging drops its lines, and
/// SIGTERM still ends the process at once and removes its socket.
#[test]
fn sigterm_exits_even_when_stderr_is_a_closed_pipe() {
    let dir = scratch_dir("sigterm-pipe");
    let sock = dir.join("viommu.sock");
    let mut child = Command::new(daemon_bin())
        .arg("--socket-path")
        .arg(&sock)
        .args(["--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(child.stderr.take()); // the reader goes away
    // A VMM that connects and leaves makes the daemon log into the pipe.
    drop(std::os::unix::net::UnixStream::connect(&sock).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: kill() on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGTERM did not end the daemon within 2 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "socket removed");
}

#[test]
fn print_capabilities_is_json_naming_the_device_type() {
    let out = Command::new(daemon_bin())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "iommu");
}

#[test]
fn bad_settings_exit_nonzero_with_the_reason() {
    let run = |args: &[&str]| {
        let out = Command::new(daemon_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--socket-path"), "{err}");
    let (code, err) = run(&["--socket-path", "/tmp/x", "--page-size-mask", "0"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("page_size_mask is 0"),
        "cause chain printed: {err}"
    );
    let (code, err) = run(&[
        "--socket-path",
        "/tmp/x",
        "--config",
        "/nonexistent/viommu.toml",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/viommu.toml"), "{err}");
    let (code, _) = run(&["--socket-path", "/nonexistent-dir/x.sock"]);
    assert_eq!(code, Some(1), "cannot bind: runtime failure");
}

#[test]
fn fd_must_be_a_listening_socket_and_is_served_when_it_is() {
    let dir = scratch_dir("fd");
    // A regular file is refused.
    let file = std::fs::File::create(dir.join("not-a-socket")).unwrap();
    let fd = file.as_raw_fd();
    let mut cmd = Command::new(daemon_bin());
    cmd.args(["--fd", &fd.to_string()]).stderr(Stdio::piped());
    clear_cloexec(fd);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a listening socket"));
    // A listening socket is accepted: a client can connect through it.
    let path = dir.join("inherited.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    clear_cloexec(fd);
    let mut child = Command::new(daemon_bin())
        .args(["--fd", &fd.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(listener);
    let stream = std::os::unix::net::UnixStream::connect(&path);
    assert!(stream.is_ok(), "the daemon listens on the inherited socket");
    std::thread::sleep(Duration::from_millis(50));
    assert!(child.try_wait().unwrap().is_none(), "still serving");
    child.kill().unwrap();
    child.wait().unwrap();
}

fn clear_cloexec(fd: i32) {
    // SAFETY: fcntl on a descriptor this test owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
    }
}
