//! Socket files owned safely, by the daemon as a process: a live daemon's
//! socket is never taken over, anything but a stale socket at the path is
//! left alone, an old daemon's exit never deletes a newer daemon's socket,
//! path errors say what is wrong; the same for the backend socket. And a
//! second VMM that connects while one is served is told so in the log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use viommu_frontend::driver::{Driver, DriverOptions};

/// Runs the daemon with `args`, expecting it to refuse to start: returns
/// its standard error.
fn refused(args: &[&str]) -> String {
    let mut child = Command::new(daemon_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the daemon kept running with {args:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until `path` exists (the daemon binds its backend socket after
/// its VMM socket).
fn wait_exists(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn serves(socket: &std::path::Path) -> bool {
    Driver::connect(socket, DriverOptions::default()).is_ok()
}

#[test]
fn a_live_daemons_socket_is_refused_and_it_keeps_serving() {
    let dir = scratch_dir("own-live");
    let sock = dir.join("viommu.sock");
    let d = Daemon::spawn(&sock, &[]);
    let err = refused(&["--socket-path", sock.to_str().unwrap()]);
    assert!(err.contains("is in use"), "{err}");
    assert!(serves(&sock), "the first daemon still serves its socket");
    drop(d);
}

#[test]
fn anything_but_a_stale_socket_at_the_path_is_left_alone() {
    let dir = scratch_dir("own-file");
    let file = dir.join("viommu.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    let err = refused(&["--socket-path", file.to_str().unwrap()]);
    assert!(err.contains("is a regular file, not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let err = refused(&["--socket-path", sub.to_str().unwrap()]);
    assert!(err.contains("is a directory"), "{err}");
    assert!(sub.is_dir());
    // A socket nothing accepts on is stale: replaced.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let d = Daemon::spawn(&stale, &[]);
    assert!(serves(&stale));
    drop(d);
}

#[test]
fn path_errors_name_the_directory_or_the_length_limit() {
    let dir = scratch_dir("own-path");
    let missing = dir.join("no/such/dir/viommu.sock");
    let err = refused(&["--socket-path", missing.to_str().unwrap()]);
    assert!(
        err.contains("does not exist") && err.contains("no/such/dir"),
        "{err}"
    );
    let long = format!("{}/{}.sock", dir.display(), "x".repeat(120));
    let err = refused(&["--socket-path", &long]);
    assert!(
        err.contains(&format!("{} bytes long", long.len())) && err.contains("at most 107 bytes"),
        "{err}"
    );
}

#[test]
fn an_old_daemons_exit_spares_a_newer_daemons_socket() {
    let dir = scratch_dir("own-newer");
    let sock = dir.join("viommu.sock");
    let backends = dir.join("backends.sock");
    let args = ["--backend-socket", backends.to_str().unwrap()];
    let mut old = Daemon::spawn(&sock, &args);
    wait_exists(&backends);
    // An operator removes the old daemon's sockets and starts a new one.
    std::fs::remove_file(&sock).unwrap();
    std::fs::remove_file(&backends).unwrap();
    let new = Daemon::spawn(&sock, &args);
    wait_exists(&backends);
    old.signal(libc::SIGTERM);
    assert!(old.wait_exit(Duration::from_secs(5)).unwrap().success());
    assert!(sock.exists() && backends.exists(), "the newer sockets stay");
    assert!(serves(&sock), "the newer daemon still serves");
    assert!(UnixStream::connect(&backends).is_ok());
    drop(new);
}

#[test]
fn a_live_backend_socket_is_refused_too() {
    let dir = scratch_dir("own-backend");
    let backends = dir.join("backends.sock");
    let d = Daemon::spawn(
        &dir.join("a.sock"),
        &["--backend-socket", backends.to_str().unwrap()],
    );
    wait_exists(&backends);
    let other = dir.join("b.sock");
    let err = refused(&[
        "--socket-path",
        other.to_str().unwrap(),
        "--backend-socket",
        backends.to_str().unwrap(),
    ]);
    assert!(err.contains("is in use"), "{err}");
    drop(d);
}

#[test]
fn a_second_vmm_is_told_to_wait_in_the_log() {
    let dir = scratch_dir("own-second");
    let sock = dir.join("viommu.sock");
    let d = Daemon::spawn(&sock, &[]);
    let _first = Driver::connect(&sock, DriverOptions::default()).unwrap();
    let _second = UnixStream::connect(&sock).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d
        .log()
        .contains("another VMM is connecting while one is served")
    {
        assert!(Instant::now() < deadline, "not logged:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        d.log().matches("another VMM is connecting").count(),
        1,
        "once per wait:\n{}",
        d.log()
    );
}

#[test]
fn socket_mode_and_group_are_applied_and_checked() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = scratch_dir("own-mode");
    let sock = dir.join("viommu.sock");
    let d = Daemon::spawn(&sock, &["--socket-mode", "0660", "--socket-group", "0"]);
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o660, 0));
    drop(d);
    let other = dir.join("b.sock");
    let err = refused(&[
        "--socket-path",
        other.to_str().unwrap(),
        "--socket-group",
        "no-such-group-here",
    ]);
    assert!(
        err.contains("socket_group") && err.contains("no group named"),
        "{err}"
    );
    let err = refused(&[
        "--socket-path",
        other.to_str().unwrap(),
        "--socket-mode",
        "888",
    ]);
    assert!(err.contains("not a file mode in octal"), "{err}");
}
