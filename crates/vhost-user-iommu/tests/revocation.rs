//! The revocation guarantee against real backends: no backend can use a
//! translation after the request that revoked it has completed — not a
//! backend that forks, sends a malformed message, dies with I/O in flight
//! or cannot be killed, and not through the table of a daemon that died.
//!
//! The real daemon, a VMM stand-in on its vhost-user socket, backends in
//! separate processes (`common::backends`), real memfd guest RAM, real
//! io_uring, a real FUSE file system and real TCP sockets. Each test is
//! written so that it fails on a daemon that forgets a backend too early.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::backends::{
    Backend, Daemon, EP, attach, map, map_range, monotonic_ns, ok, ram_fd, request_racing,
    run_cases, scratch, unmap, unmap_range,
};
use iotlb_shm::backend_proto::Message;
use viommu_frontend::driver::Driver;
use viommu_test_support::fuse::FuseDisk;
use virtio_iommu_proto::Status;
use vm_memory::Bytes;

/// How long a request must stay pending to count as "held back".
const HELD: Duration = Duration::from_millis(500);

fn hexed(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn needs_root() -> Result<(), String> {
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        return Err("needs root".into());
    }
    Ok(())
}

/// Maps 0x1000 → 0x8000 for the endpoint and starts a backend (as `uid`
/// if given) that enters a session holding that translation.
fn backend_in_session(d: &Daemon, uid: Option<u32>) -> (Driver, Backend) {
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, 0x1000, 0x8000));
    let mut b = Backend::spawn(&d.backends, uid);
    let hello = b.line();
    assert!(hello.starts_with("connected"), "{hello}");
    assert_eq!(b.ask(&format!("enter {EP:x} 1234")), "gpa 0x8234");
    (drv, b)
}

/// Case 1. A backend forks while inside a session (daemonizing, a prefork
/// pool) and its parent exits: the child still has the translation and the
/// connection, so the UNMAP waits until the child is gone too.
fn fork_then_exit_a_child_holding_the_connection_holds_the_unmap() {
    let d = Daemon::start("fork", &[]);
    let (mut drv, mut b) = backend_in_session(&d, None);
    let forked = b.ask("fork-exit");
    assert!(forked.starts_with("forked "), "{forked}");
    let status = b.child.wait().unwrap();
    assert!(status.success(), "the parent exits inside its session");
    let (early, status) = request_racing(&mut drv, unmap(1, 0x1000), HELD, || {
        // The child leaves: now nothing holds the translation.
        b.send("x");
    });
    assert!(
        !early,
        "UNMAP completed while a forked child of the backend still held the connection and the translation"
    );
    assert_eq!(status, Some(Status::Ok));
}

/// Case 2. Malformed or unexpected messages from a live backend inside a
/// session are answered with ERROR; the backend stays registered and the
/// UNMAP waits for its session.
fn protocol_errors_never_drop_a_live_backend() {
    let d = Daemon::start("proto", &[]);
    let (mut drv, mut b) = backend_in_session(&d, None);
    let eproto = format!("error {}", libc::EPROTO);
    let hello = Message::Hello { slots: 1, pins: 1 }.encode();
    let mut unknown = Message::Ack { cookie: 1 }.encode();
    unknown[8] = 99;
    let fault = Message::Fault(iotlb_shm::Fault {
        kind: iotlb_shm::FaultKind::Mapping,
        endpoint: EP,
        iova: 0x1000,
        access: iotlb_shm::Access::READ,
    })
    .encode();
    let mut bad_fault = fault.clone();
    bad_fault[16 + 4] = 9; // access 9
    let mut foreign = hello.clone();
    foreign[0] = b'X';
    let mut answers = Vec::new();
    for (what, cmd) in [
        ("a second HELLO", format!("raw {}", hexed(&hello))),
        ("an unknown type", format!("raw {}", hexed(&unknown))),
        (
            "a FAULT with a bad field",
            format!("raw {}", hexed(&bad_fault)),
        ),
        (
            "a FAULT with 64 descriptors (truncated ancillary data)",
            format!("raw-fds 40 {}", hexed(&fault)),
        ),
        (
            "a WELCOME from a backend",
            format!("raw {}", hexed(&Message::Welcome { reader_id: 3 }.encode())),
        ),
        // Last: the framing is lost, nothing else of the connection is read.
        (
            "a header with a foreign magic",
            format!("raw {}", hexed(&foreign)),
        ),
    ] {
        answers.push((what, b.ask(&cmd)));
    }
    let (early, status) = request_racing(&mut drv, unmap(1, 0x1000), HELD, || {
        assert_eq!(b.ask("exit"), "left");
    });
    assert!(
        !early,
        "UNMAP completed under the session of a live backend that sent a bad message ({answers:?})"
    );
    assert_eq!(status, Some(Status::Ok));
    for (what, answer) in answers {
        assert_eq!(answer, eproto, "the answer to {what}");
    }
    assert!(
        d.log().contains("refused a message from a backend"),
        "{}",
        d.log()
    );
}

/// Case 3a. A backend dies with MSG_ZEROCOPY sends still queued on a TCP
/// socket (its peer is slow): the kernel reads the pages when it finally
/// transmits them. The UNMAP waits until the socket has sent everything,
/// so nothing the guest writes after the UNMAP ever leaves on the wire.
fn a_backend_that_dies_with_a_zero_copy_send_queued_holds_the_unmap() {
    dies_with_a_send_queued("zc", "zc-send");
}

/// Case 3b. The same with IORING_OP_SEND_ZC on a registered io_uring.
fn a_backend_that_dies_with_an_io_uring_zero_copy_send_queued_holds_the_unmap() {
    dies_with_a_send_queued("zcring", "zc-ring-send");
}

fn dies_with_a_send_queued(name: &str, command: &str) {
    const LEN: u64 = 8 << 20;
    const IOVA: u64 = 0x100_0000;
    let d = Daemon::start(name, &[]);
    let mut drv = d.driver();
    let gpa = drv.ram().alloc(LEN, 0x20_0000).unwrap();
    drv.ram()
        .mem()
        .write_slice(&vec![b'A'; LEN as usize], gpa)
        .unwrap();
    ok(&mut drv, attach(1));
    ok(&mut drv, map_range(1, IOVA, LEN, gpa.0));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut b = Backend::spawn_with_ram(&d.backends, None, Some(ram_fd(&mut drv)));
    assert!(b.line().starts_with("connected"));
    let sent = b.ask(&format!("{command} {EP:x} {IOVA:x} {LEN:x} {port:x}"));
    let sent: usize = sent
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{sent}"));
    assert!(sent > 1 << 20, "too little queued to test anything: {sent}");
    let (mut peer, _) = listener.accept().unwrap();
    b.kill9();
    let mut received = Vec::new();
    let ram = drv.ram().mem().clone();
    let (early, status) = request_racing(&mut drv, unmap_range(1, IOVA, LEN), HELD, || {
        // The slow peer reads at last; the queue drains.
        peer.read_to_end(&mut received).unwrap();
    });
    // The guest reuses its pages as soon as the UNMAP completed.
    ram.write_slice(&vec![b'B'; LEN as usize], gpa).unwrap();
    if early {
        peer.read_to_end(&mut received).unwrap();
    }
    let leaked = received.iter().filter(|&&x| x == b'B').count();
    assert_eq!(
        leaked, 0,
        "{leaked} bytes the guest wrote after the UNMAP completed went out on the dead backend's socket"
    );
    assert!(
        !early,
        "UNMAP completed while the dead backend's send was still queued"
    );
    assert_eq!(received.len(), sent, "every queued byte was sent");
    assert_eq!(status, Some(Status::Ok));
}

/// Case 3c. A backend dies with an O_DIRECT io_uring read still in flight
/// on a slow file (FUSE, async direct I/O): the kernel writes the page when
/// the read completes. The UNMAP waits for it, so the guest's reuse of the
/// page is never overwritten.
fn a_backend_that_dies_with_an_io_uring_read_in_flight_holds_the_unmap() -> Result<(), String> {
    needs_root()?;
    const IOVA: u64 = 0x40_0000;
    let dir = scratch("fuse");
    let disk = FuseDisk::mount(&dir.join("mnt"), 1 << 20)?;
    let d = Daemon::start_in(
        &dir,
        env!("CARGO_BIN_EXE_vhost-user-iommu").as_ref(),
        None,
        &[],
    );
    let mut drv = d.driver();
    let gpa = drv.ram().alloc(0x1000, 0x1000).unwrap();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, IOVA, gpa.0));
    let mut b = Backend::spawn_with_ram(&d.backends, None, Some(ram_fd(&mut drv)));
    assert!(b.line().starts_with("connected"));
    assert_eq!(
        b.ask(&format!(
            "uring-read {EP:x} {IOVA:x} {}",
            disk.file().display()
        )),
        "submitted"
    );
    let read = disk
        .next_read(Duration::from_secs(5))
        .ok_or("the read never reached the file system")?;
    b.kill9();
    let ram = drv.ram().mem().clone();
    let page = |ram: &viommu_frontend::memory::Mem| {
        let mut p = [0u8; 0x1000];
        ram.read_slice(&mut p, gpa).unwrap();
        p
    };
    let (early, status) = request_racing(&mut drv, unmap(1, IOVA), HELD, || {
        // The slow disk answers at last: the dead backend's read lands.
        disk.answer(&read, b'F');
    });
    if early {
        // The guest reuses the page; the read is still in flight.
        ram.write_slice(&[b'B'; 0x1000], gpa).unwrap();
        disk.answer(&read, b'F');
    } else {
        assert!(
            page(&ram).iter().all(|&x| x == b'F'),
            "the read landed before the UNMAP completed"
        );
        ram.write_slice(&[b'B'; 0x1000], gpa).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        page(&ram).iter().all(|&x| x == b'B'),
        "the dead backend's read overwrote the page after the UNMAP completed"
    );
    assert!(
        !early,
        "UNMAP completed while the dead backend's read was in flight"
    );
    assert_eq!(status, Some(Status::Ok));
    drop(disk);
    Ok(())
}

/// Case 4. `--stall-kill-ms` with an unprivileged daemon and a backend of
/// another uid: the kill is refused (EPERM). That is not a kill: the UNMAP
/// waits until the backend leaves its session.
fn a_stall_kill_that_fails_is_not_a_kill() -> Result<(), String> {
    needs_root()?;
    const DAEMON_UID: u32 = 65534;
    const BACKEND_UID: u32 = 65533;
    let dir = scratch("killfail");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| e.to_string())?;
    // The build directory may not be reachable by another user.
    let binary = dir.join("vhost-user-iommu");
    std::fs::copy(env!("CARGO_BIN_EXE_vhost-user-iommu"), &binary).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let d = Daemon::start_in(
        &dir,
        &binary,
        Some(DAEMON_UID),
        &[
            "--stall-warn-ms",
            "50",
            "--stall-kill-ms",
            "200",
            "--backend-uid",
            &BACKEND_UID.to_string(),
        ],
    );
    let (mut drv, mut b) = backend_in_session(&d, Some(BACKEND_UID));
    let (early, status) =
        request_racing(&mut drv, unmap(1, 0x1000), Duration::from_secs(1), || {
            assert!(
                b.child.try_wait().unwrap().is_none(),
                "the backend was killed after all"
            );
            d.wait_for_log("could not kill a stuck backend", Duration::from_secs(5));
            assert_eq!(b.ask("exit"), "left");
        });
    assert!(
        !early,
        "UNMAP completed after a kill that failed, while the backend was alive in its session"
    );
    assert_eq!(status, Some(Status::Ok));
    Ok(())
}

/// A kill that works still waits for the process to be gone.
fn a_stall_kill_that_works_completes_the_unmap_once_the_backend_is_gone() {
    let d = Daemon::start("kill", &["--stall-warn-ms", "20", "--stall-kill-ms", "200"]);
    let (mut drv, mut b) = backend_in_session(&d, None);
    assert_eq!(
        drv.send_one(&unmap(1, 0x1000)).unwrap().status(),
        Some(Status::Ok)
    );
    let status = b.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(
        d.log()
            .contains("killed a backend stuck past --stall-kill-ms")
    );
}

/// Case 5. The daemon is killed with -9 while a backend translates in a
/// loop: no session that began after the daemon was gone gets a
/// translation; they all fault DETACHED. A restarted daemon's table is
/// reached only by connecting again.
fn a_dead_daemon_fails_every_translation_closed() {
    let mut d = Daemon::start("dead", &[]);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, 0x1000, 0x8000));
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    assert_eq!(b.ask(&format!("loop {EP:x} 1000 8000")), "looping");
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGKILL) };
    d.child.wait().unwrap();
    let dead_at = monotonic_ns();
    let report = b.line();
    let field = |name: &str| -> u64 {
        report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {report}"))
    };
    assert_eq!(field("wrong"), 0, "{report}");
    assert!(
        field("ok") > 0,
        "the backend translated while the daemon lived: {report}"
    );
    assert!(
        field("detached") > 0,
        "the backend never saw the daemon die: {report}"
    );
    assert!(
        field("last_ok") < dead_at,
        "a session that began after the daemon was gone got a translation: {report}"
    );
    // A new daemon (a fresh device) on the same paths.
    drop(drv);
    let _ = std::fs::remove_file(&d.vmm);
    let _ = std::fs::remove_file(&d.backends);
    let d2 = Daemon::start_in(
        &d.dir,
        env!("CARGO_BIN_EXE_vhost-user-iommu").as_ref(),
        None,
        &[],
    );
    let mut drv = d2.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, 0x1000, 0xa000));
    assert_eq!(
        b.ask(&format!("translate {EP:x} 1000")),
        "fault Detached",
        "the old table still translates"
    );
    assert!(b.ask("reconnect").starts_with("connected"));
    assert_eq!(b.ask(&format!("translate {EP:x} 1000")), "gpa 0xa000");
}

/// PREVIOUS_TABLE (what a reconnecting backend holds of previous daemons'
/// tables) is checked before anything is registered: every descriptor must
/// be a retired slot file, at most 8 of them; a connection says it once.
fn previous_table_messages_are_checked_and_accepted_once() {
    let d = Daemon::start("previous", &[]);
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    let previous = Message::PreviousTable {
        cookie: 5,
        replaced: vec![],
    }
    .encode();
    let einval = format!("error {}", libc::EINVAL);
    assert_eq!(
        b.ask(&format!("raw-fds 1 {}", hexed(&previous))),
        einval,
        "not a slot file"
    );
    assert_eq!(
        b.ask(&format!("raw-fds 2 {}", hexed(&previous))),
        einval,
        "not slot files"
    );
    assert_eq!(
        b.ask(&format!("raw-fds 9 {}", hexed(&previous))),
        format!("error {}", libc::EPROTO),
        "more than 8 files"
    );
    assert_eq!(b.ask("previous-file fresh"), einval, "not retired");
    // Refusals changed nothing: the declaration is still to be made.
    assert_eq!(b.ask("previous-file retired"), "other Ack { cookie: 5 }");
    assert_eq!(
        b.ask(&format!("raw {}", hexed(&previous))),
        format!("error {}", libc::EPROTO),
        "said twice"
    );
    assert!(
        d.log()
            .contains("backend handed over previous daemons' tables"),
        "{}",
        d.log()
    );
}

fn main() {
    run_cases(
        "revocation",
        &[
            (
                "fork_then_exit_a_child_holding_the_connection_holds_the_unmap",
                || {
                    fork_then_exit_a_child_holding_the_connection_holds_the_unmap();
                    Ok(())
                },
            ),
            ("protocol_errors_never_drop_a_live_backend", || {
                protocol_errors_never_drop_a_live_backend();
                Ok(())
            }),
            (
                "previous_table_messages_are_checked_and_accepted_once",
                || {
                    previous_table_messages_are_checked_and_accepted_once();
                    Ok(())
                },
            ),
            (
                "a_backend_that_dies_with_a_zero_copy_send_queued_holds_the_unmap",
                || {
                    a_backend_that_dies_with_a_zero_copy_send_queued_holds_the_unmap();
                    Ok(())
                },
            ),
            (
                "a_backend_that_dies_with_an_io_uring_zero_copy_send_queued_holds_the_unmap",
                || {
                    a_backend_that_dies_with_an_io_uring_zero_copy_send_queued_holds_the_unmap();
                    Ok(())
                },
            ),
            (
                "a_backend_that_dies_with_an_io_uring_read_in_flight_holds_the_unmap",
                a_backend_that_dies_with_an_io_uring_read_in_flight_holds_the_unmap,
            ),
            (
                "a_stall_kill_that_fails_is_not_a_kill",
                a_stall_kill_that_fails_is_not_a_kill,
            ),
            (
                "a_stall_kill_that_works_completes_the_unmap_once_the_backend_is_gone",
                || {
                    a_stall_kill_that_works_completes_the_unmap_once_the_backend_is_gone();
                    Ok(())
                },
            ),
            ("a_dead_daemon_fails_every_translation_closed", || {
                a_dead_daemon_fails_every_translation_closed();
                Ok(())
            }),
        ],
    );
}
