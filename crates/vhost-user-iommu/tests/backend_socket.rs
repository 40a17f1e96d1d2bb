//! The backend socket end to end: the real daemon, a VMM stand-in
//! (viommu-frontend's driver) on the vhost-user socket, and a backend in a
//! separate process that gets the table over the backend socket.
//!
//! The backend is this same test binary re-executed with
//! `VIOMMU_TEST_BACKEND=<socket>` (hence `harness = false`): it connects,
//! then obeys one command per stdin line and answers on stdout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::backends::{Backend, Daemon, EP, attach, map, ok, run_cases, unmap};
use iotlb_shm::BackendClient;
use viommu_frontend::driver::{Driver, DriverOptions};
use virtio_iommu_proto::Status;

// ---------------------------------------------------------------- tests

/// Every MAP is in the table by the time its used entry appears: the
/// backend, asked right after each completion, always finds it.
fn a_map_is_in_the_table_before_it_completes() {
    let d = Daemon::start("map", &[]);
    let mut drv = d.driver();
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    assert_eq!(
        b.ask(&format!("translate {EP:x} 1000")),
        "gpa 0x1000",
        "unattached endpoints bypass by default"
    );
    ok(&mut drv, attach(1));
    for i in 0..200u64 {
        let iova = 0x10_0000 + i * 0x1000;
        ok(&mut drv, map(1, iova, 0x20_0000 + i * 0x1000));
        assert_eq!(
            b.ask(&format!("translate {EP:x} {:x}", iova + 0x10)),
            format!("gpa {:#x}", 0x20_0010 + i * 0x1000)
        );
    }
    ok(&mut drv, unmap(1, 0x10_0000));
    assert_eq!(
        b.ask(&format!("translate {EP:x} 100000")),
        "fault Mapping",
        "UNMAP completed: gone"
    );
}

/// An UNMAP waits for a backend inside a session on the range, and
/// completes when the backend leaves the session, or dies in it.
fn an_unmap_waits_for_a_backend_session_then_for_nothing_once_it_dies() {
    let d = Daemon::start("grace", &[]);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, 0x1000, 0x8000));
    ok(&mut drv, map(1, 0x2000, 0x9000));
    let mut b = Backend::spawn(&d.backends, None);
    assert!(
        b.line().starts_with("connected"),
        "a late backend sees the current table"
    );
    assert_eq!(b.ask(&format!("enter {EP:x} 1000")), "gpa 0x8000");
    let (tx, rx) = mpsc::channel();
    let mut drv = std::thread::scope(|s| {
        let h = s.spawn(move || {
            let out = drv.send_one(&unmap(1, 0x1000)).unwrap();
            tx.send(out.status()).unwrap();
            drv
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "UNMAP completed inside a backend session"
        );
        b.send("exit");
        assert_eq!(b.line(), "left");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Some(Status::Ok)
        );
        h.join().unwrap()
    });
    // Now the backend dies inside a session.
    assert_eq!(b.ask(&format!("enter {EP:x} 2000")), "gpa 0x9000");
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            tx.send(drv.send_one(&unmap(1, 0x2000)).unwrap().status())
                .unwrap()
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "UNMAP completed inside a backend session"
        );
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(b.child.id() as i32, libc::SIGKILL) };
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Some(Status::Ok),
            "stuck on a dead backend"
        );
    });
    // The connection thread notices the end of the socket on its own time.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log().contains("backend disconnected") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(d.log().contains("backend disconnected"), "{}", d.log());
}

/// A backend's fault reaches the guest's event queue as a fault record.
fn a_backend_fault_reaches_the_event_queue() {
    let d = Daemon::start("fault", &[]);
    let mut drv = d.driver();
    drv.post_event_buffers(4, 24).unwrap();
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    assert_eq!(b.ask(&format!("fault {EP:x} dead0000")), "sent");
    let events = drv.take_events(Duration::from_secs(5)).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let rec = events[0].record.expect("a well-formed fault record");
    assert_eq!(rec.endpoint, EP);
    assert_eq!(rec.address, Some(0xdead_0000));
    assert_eq!(rec.reason, virtio_iommu_proto::FaultReason::Mapping);
    assert_eq!(rec.access, virtio_iommu_proto::FaultFlags::WRITE);
}

/// A fault a backend reports while no VMM is connected (between two
/// guests) reaches neither guest, and the next guest's device works: the
/// fault must not reach a device whose guest memory is not set up yet.
fn a_fault_reported_between_two_vmms_reaches_neither_and_stops_nothing() {
    let d = Daemon::start("fault-between", &[]);
    {
        let mut drv = d.driver();
        ok(&mut drv, attach(1));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches("waiting for a VMM to connect").count() < 2 {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    assert_eq!(b.ask(&format!("fault {EP:x} 1000")), "sent");
    // The daemon reads a backend's messages in order: once it has seen the
    // backend leave, it has handled the fault.
    drop(b);
    d.wait_for_log("backend disconnected", Duration::from_secs(10));
    let mut drv = d.driver();
    drv.post_event_buffers(4, 24).unwrap();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, 0x1000, 0x8000));
    let events = drv.take_events(Duration::from_millis(500)).unwrap();
    assert!(
        events.is_empty(),
        "the previous guest's fault reached the new one: {events:?}"
    );
}

/// DEV-FAULT-5: a record never spreads over buffers; a 16-byte buffer is
/// returned unwritten (used length 0), the next 24-byte one gets a record.
fn dev_fault_5_a_buffer_too_small_gets_no_partial_record() {
    let d = Daemon::start("fault5", &[]);
    let mut drv = d.driver();
    drv.post_event_buffers(1, 16).unwrap();
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    assert_eq!(b.ask(&format!("fault {EP:x} 1000")), "sent");
    let events = drv.take_events(Duration::from_secs(5)).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].used_len, 0);
    assert!(
        events[0].bytes.iter().all(|&x| x == 0),
        "a partial record was written: {:?}",
        events[0].bytes
    );
    drv.post_event_buffers(1, 24).unwrap();
    assert_eq!(b.ask(&format!("fault {EP:x} 2000")), "sent");
    let events = drv.take_events(Duration::from_secs(5)).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].used_len, 24);
    assert_eq!(events[0].record.expect("record").address, Some(0x2000));
}

/// DEV-FAULT-7: with no event buffer, faults wait (bounded, oldest dropped)
/// and the request queue is never held up by them.
fn dev_fault_7_faults_never_block_the_request_queue() {
    let d = Daemon::start("fault7", &[]);
    let mut drv = d.driver();
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    assert_eq!(b.ask(&format!("faults 12c {EP:x} 100000")), "sent"); // 300 faults
    ok(&mut drv, attach(1));
    for i in 0..100u64 {
        ok(&mut drv, map(1, i * 0x1000, 0x8000));
    }
    // The daemon reads a backend's messages in order: once it has seen the
    // backend leave, every fault is queued. Then offer buffers.
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("backend disconnected") {
        assert!(
            Instant::now() < deadline,
            "the daemon never saw the backend leave"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drv.post_event_buffers(256, 24).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while records.len() < 256 && Instant::now() < deadline {
        records.extend(drv.take_events(Duration::from_millis(200)).unwrap());
    }
    assert_eq!(
        records.len(),
        256,
        "one record per buffer, up to the pending bound"
    );
    let first = records[0].record.expect("record");
    assert_eq!(
        first.address,
        Some(0x10_0000 + 44 * 0x1000),
        "the 44 oldest of 300 were dropped"
    );
    assert_eq!(first.reason, virtio_iommu_proto::FaultReason::Domain);
    assert_eq!(first.access, virtio_iommu_proto::FaultFlags::READ);
}

/// A new VMM connection is a fresh device: the table the backend reads is
/// emptied, then mirrors the new device.
fn a_vmm_reconnect_resets_the_table_backends_keep_reading() {
    let d = Daemon::start("reconnect", &["--bypass", "off"]);
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    {
        let mut drv = d.driver();
        ok(&mut drv, attach(1));
        ok(&mut drv, map(1, 0x1000, 0x8000));
        assert_eq!(b.ask(&format!("translate {EP:x} 1000")), "gpa 0x8000");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut drv = loop {
        // The daemon accepts the next VMM once it has dropped the previous one.
        match Driver::connect(
            &d.vmm,
            DriverOptions {
                ram_size: 64 << 20,
                ..DriverOptions::default()
            },
        ) {
            Ok(drv) => break drv,
            Err(e) => {
                assert!(Instant::now() < deadline, "no reconnect: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(
        b.ask(&format!("translate {EP:x} 1000")),
        "fault Domain",
        "old device's state survived"
    );
    ok(&mut drv, attach(2));
    ok(&mut drv, map(2, 0x1000, 0xa000));
    assert_eq!(b.ask(&format!("translate {EP:x} 1000")), "gpa 0xa000");
}

/// Only the daemon's user, root and `--backend-uid` users may connect.
fn backends_of_other_users_are_refused_unless_allowed() -> Result<(), String> {
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        return Err("needs root to run a backend as another user".into());
    }
    // Without --backend-uid the socket file itself keeps other users out.
    let d = Daemon::start("uid", &[]);
    let mut b = Backend::spawn(&d.backends, Some(65534));
    assert!(b.line().starts_with("refused"));
    drop(d);
    // With another user allowed, a third one reaches the daemon and is
    // refused by its credentials.
    let d = Daemon::start("uid1", &["--backend-uid", "1234"]);
    let mut b = Backend::spawn(&d.backends, Some(65534));
    let answer = b.line();
    assert!(
        answer.starts_with("refused") && answer.contains("uid 65534 is not allowed"),
        "{answer}"
    );
    drop(d);
    let d = Daemon::start("uid2", &["--backend-uid", "65534"]);
    let mut b = Backend::spawn(&d.backends, Some(65534));
    assert!(b.line().starts_with("connected"));
    Ok(())
}

/// The MAPs past what the table can hold answer NOMEM, and the device and
/// the table stay in step (the refused range is not mapped, later MAPs work).
fn a_full_table_answers_nomem_and_stays_consistent() {
    // 2 MiB table = 512 nodes; scattered pages need 3 nodes each.
    let d = Daemon::start("full", &["--table-max-mib", "2", "--max-domains", "4"]);
    let mut drv = d.driver();
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    ok(&mut drv, attach(1));
    let mut refused = None;
    for i in 0..1000u64 {
        let iova = i << 30;
        match drv.send_one(&map(1, iova, 0x1000)).unwrap().status() {
            Some(Status::Ok) => {}
            Some(Status::NoMem) => {
                refused = Some(iova);
                break;
            }
            other => panic!("MAP {i}: {other:?}"),
        }
    }
    let iova = refused.expect("the table never filled");
    assert_eq!(
        b.ask(&format!("translate {EP:x} {iova:x}")),
        "fault Mapping",
        "a refused MAP is not in the table"
    );
    // The model agrees: mapping the same range again is still NOMEM (not
    // INVAL for an overlap), and UNMAP of it is a no-op.
    assert_eq!(
        drv.send_one(&map(1, iova, 0x1000)).unwrap().status(),
        Some(Status::NoMem)
    );
    ok(&mut drv, unmap(1, 0));
    ok(&mut drv, map(1, iova, 0x1000));
    assert_eq!(b.ask(&format!("translate {EP:x} {iova:x}")), "gpa 0x1000");
}

/// A runaway client cannot exhaust the daemon's threads: past 256
/// connections backends are refused with EBUSY, and room comes back as
/// connections close.
fn backend_connections_are_bounded() {
    let d = Daemon::start("bound", &[]);
    let held: Vec<_> = (0..256)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.backends).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    match BackendClient::connect(&d.backends, 1, 1) {
        Err(iotlb_shm::ClientError::Refused { code, reason }) => {
            assert_eq!(code, libc::EBUSY as u32, "{reason}");
        }
        other => panic!("connection 257 was not refused: {other:?}"),
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match BackendClient::connect(&d.backends, 1, 1) {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no room after the connections closed: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    run_cases(
        "backend-socket",
        &[
            ("a_map_is_in_the_table_before_it_completes", || {
                a_map_is_in_the_table_before_it_completes();
                Ok(())
            }),
            (
                "an_unmap_waits_for_a_backend_session_then_for_nothing_once_it_dies",
                || {
                    an_unmap_waits_for_a_backend_session_then_for_nothing_once_it_dies();
                    Ok(())
                },
            ),
            (
                "dev_fault_5_a_buffer_too_small_gets_no_partial_record",
                || {
                    dev_fault_5_a_buffer_too_small_gets_no_partial_record();
                    Ok(())
                },
            ),
            ("dev_fault_7_faults_never_block_the_request_queue", || {
                dev_fault_7_faults_never_block_the_request_queue();
                Ok(())
            }),
            (
                "a_fault_reported_between_two_vmms_reaches_neither_and_stops_nothing",
                || {
                    a_fault_reported_between_two_vmms_reaches_neither_and_stops_nothing();
                    Ok(())
                },
            ),
            ("a_backend_fault_reaches_the_event_queue", || {
                a_backend_fault_reaches_the_event_queue();
                Ok(())
            }),
            (
                "a_vmm_reconnect_resets_the_table_backends_keep_reading",
                || {
                    a_vmm_reconnect_resets_the_table_backends_keep_reading();
                    Ok(())
                },
            ),
            (
                "backends_of_other_users_are_refused_unless_allowed",
                backends_of_other_users_are_refused_unless_allowed,
            ),
            ("a_full_table_answers_nomem_and_stays_consistent", || {
                a_full_table_answers_nomem_and_stays_consistent();
                Ok(())
            }),
            ("backend_connections_are_bounded", || {
                backend_connections_are_bounded();
                Ok(())
            }),
        ],
    );
}
