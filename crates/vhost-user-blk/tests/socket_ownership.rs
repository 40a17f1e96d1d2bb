//! The block backend's socket is owned safely, as the daemon's is
//! (`vhost_user_process::socket_file`): a live backend's socket and
//! anything that is not a stale socket are left alone, with an error that
//! says why; the process removes only the socket it created.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    let dir = viommu_test_support::scratch::dir("vublk-own", name);
    std::fs::write(dir.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    dir
}

fn command(dir: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--blk-file")
        .arg(dir.join("disk.img"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn refused(dir: &Path, socket: &Path) -> String {
    let mut child = command(dir, socket).stderr(Stdio::piped()).spawn().unwrap();
    assert!(!wait_exit(&mut child).success());
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned()
}

#[test]
fn a_regular_file_or_a_live_socket_at_the_path_is_refused_and_left_alone() {
    let dir = scratch("refuse");
    let file = dir.join("blk.sock");
    std::fs::write(&file, b"keep").unwrap();
    let err = refused(&dir, &file);
    assert!(err.contains("is a regular file, not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    let live = dir.join("live.sock");
    let mut first = command(&dir, &live).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&live).is_err() {
        assert!(
            Instant::now() < deadline,
            "the first backend never listened"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = refused(&dir, &live);
    assert!(err.contains("is in use"), "{err}");
    // SAFETY: kill() on our own child's pid has no memory effects.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut first).success());
    assert!(!live.exists(), "its own socket removed at exit");
}

/// `--print-capabilities` follows QEMU's `vhost-user.json`: type "block"
/// with the schema's feature names for the options this backend has.
#[test]
fn print_capabilities_uses_the_schema_names() {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "block");
    assert_eq!(v["features"], serde_json::json!(["read-only", "blk-file"]));
}
