//! When the writer forgets a reader (`registry`'s rules), in one process
//! with real pidfds, sockets, pipes and io_uring instances: never because a
//! process exited while its connection, slot file or I/O lives on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use iotlb_shm::drain::{self, RingSentinel};
use iotlb_shm::{
    Access, EndpointTarget, FaultKind, Perms, ReaderProcess, ReaderState, ReleaseReason,
    SentinelSlot, SlotFile, TableReader, TableWriter, TrackedIo, WriterConfig,
};

const RW: Perms = Perms {
    read: true,
    write: true,
    mmio: false,
};

fn writer() -> TableWriter {
    writer_with(false)
}

/// [`writer`], with its table outliving it if `handover`.
fn writer_with(handover: bool) -> TableWriter {
    let mut w = TableWriter::new(&WriterConfig {
        handover,
        ..WriterConfig::default()
    })
    .unwrap();
    w.create_domain(1).unwrap();
    w.set_endpoint(8, EndpointTarget::Domain(1)).unwrap();
    w.map(1, 0x1000, 0x1fff, 0x8000, RW).unwrap();
    w
}

/// A process that has exited (reaped), for readers whose process is gone.
fn exited_process() -> ReaderProcess {
    let mut child = Command::new("true").spawn().unwrap();
    let process = ReaderProcess::watch(child.id() as i32).unwrap();
    child.wait().unwrap();
    process
}

/// Waits (up to 5 s) until the exited reader `id` is released.
fn wait_released(w: &mut TableWriter, id: iotlb_shm::ReaderId) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match w.try_release_reader(id) {
            Some(ReaderState::Released(ReleaseReason::ExitedAndDrained)) => return,
            other => assert!(Instant::now() < deadline, "still {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ring_fd(ring: &io_uring::IoUring) -> BorrowedFd<'_> {
    // SAFETY: the ring's descriptor stays open as long as the borrow.
    unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) }
}

/// This (live) process registered as a reader with a connection: the
/// reader, the backend's end of the connection, the slot file.
fn connected_reader(w: &mut TableWriter) -> (iotlb_shm::ReaderId, UnixStream, OwnedFd) {
    let (daemon_end, backend_end) = UnixStream::pair().unwrap();
    let slot_fd = iotlb_shm::slots::create(2, 2).unwrap();
    let process = ReaderProcess {
        connection: Some(daemon_end.into()),
        ..ReaderProcess::watch(std::process::id() as i32).unwrap()
    };
    let id = w.register_process(slot_fd.as_fd(), process).unwrap();
    (id, backend_end, slot_fd)
}

#[test]
fn a_closed_slot_file_releases_its_reader_at_once_even_with_the_connection_open() {
    let mut w = writer();
    let (id, backend_end, slot_fd) = connected_reader(&mut w);
    let file = SlotFile::open(slot_fd.as_fd()).unwrap();
    let slot = file.claim_slot().unwrap();
    assert_eq!(w.try_release_reader(id), Some(ReaderState::Active));
    drop(file);
    assert_eq!(
        w.try_release_reader(id),
        Some(ReaderState::Active),
        "a claimed slot keeps the file open"
    );
    drop(slot);
    assert_eq!(
        w.try_release_reader(id),
        Some(ReaderState::Released(ReleaseReason::SlotsClosed))
    );
    assert_eq!(w.try_release_reader(id), None, "released once");
    drop(backend_end);
}

/// A live process that closed its connection but still maps its slot file
/// (a daemonizing backend that closed every descriptor, say) keeps counting:
/// the UNMAP waits for its session.
#[test]
fn a_live_process_that_closed_its_connection_still_holds_the_unmap() {
    let mut w = writer();
    let (id, backend_end, slot_fd) = connected_reader(&mut w);
    let table = TableReader::open(w.table_fd(), w.arena_fd()).unwrap();
    let file = SlotFile::open(slot_fd.as_fd()).unwrap();
    let mut slot = file.claim_slot().unwrap();
    drop(backend_end);
    // Another test thread's fork (before its exec) may briefly hold a copy
    // of the peer socket: the hang-up shows once that copy is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match w.try_release_reader(id) {
            Some(ReaderState::Lingering) => break,
            Some(ReaderState::Active) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => panic!("a live process without its connection: {other:?}, not Lingering"),
        }
    }
    std::thread::scope(|s| {
        let session = slot.enter(&table);
        assert_eq!(
            session.translate_one(8, 0x1234, Access::READ).unwrap().gpa,
            0x8234
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let w = &mut w;
        s.spawn(move || {
            w.unmap(1, 0x1000, 0x1fff).unwrap();
            tx.send(w.synchronize()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the UNMAP completed under a session of a live process"
        );
        drop(session);
        let report = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(report.reaped, 0);
    });
}

#[test]
fn an_exited_process_whose_connection_is_held_elsewhere_is_kept() {
    let mut w = writer();
    let (daemon_end, backend_end) = UnixStream::pair().unwrap();
    let slot_fd = iotlb_shm::slots::create(2, 2).unwrap();
    let process = ReaderProcess {
        connection: Some(daemon_end.into()),
        ..exited_process()
    };
    let id = w.register_process(slot_fd.as_fd(), process).unwrap();
    assert_eq!(w.try_release_reader(id), Some(ReaderState::ConnectionHeld));
    drop(backend_end);
    // (A fork in another test thread may hold the peer for a moment.)
    wait_released(&mut w, id);
}

#[test]
fn an_exited_reader_is_kept_until_its_ring_is_gone() {
    let mut w = writer();
    let slot_fd = iotlb_shm::slots::create(2, 2).unwrap();
    let id = w
        .register_process(slot_fd.as_fd(), exited_process())
        .unwrap();
    let ring: io_uring::IoUring = io_uring::IoUring::new(4).unwrap();
    let fd =
        drain::arm_ring_sentinel(ring_fd(&ring), SentinelSlot::NewTable { entries: 4 }).unwrap();
    w.track_io(id, TrackedIo::Ring(RingSentinel::new(fd).unwrap()))
        .unwrap();
    assert_eq!(
        w.try_release_reader(id),
        Some(ReaderState::Draining { pending: 1 })
    );
    // The ring's own table slots 1..4 stay usable by the backend.
    let spare = std::fs::File::open("/dev/null").unwrap();
    ring.submitter()
        .register_files_update(1, &[spare.as_raw_fd()])
        .unwrap();
    drop(ring);
    wait_released(&mut w, id);
}

#[test]
fn a_sentinel_must_be_a_live_pipe_read_end() {
    let ring: io_uring::IoUring = io_uring::IoUring::new(4).unwrap();
    let fd =
        drain::arm_ring_sentinel(ring_fd(&ring), SentinelSlot::NewTable { entries: 1 }).unwrap();
    assert!(RingSentinel::new(fd).is_ok());
    let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    assert!(RingSentinel::new(file).is_err(), "not a pipe");
    let (r, w) = std::io::pipe().unwrap();
    let w: OwnedFd = w.into();
    assert!(RingSentinel::new(w).is_err(), "write end");
    assert!(
        RingSentinel::new(r.into()).is_err(),
        "its write end is closed: no ring holds it"
    );
    let other: io_uring::IoUring = io_uring::IoUring::new(4).unwrap();
    assert!(
        drain::arm_ring_sentinel(ring_fd(&other), SentinelSlot::Index(3)).is_err(),
        "no table to put it in"
    );
}

#[test]
fn an_exited_reader_is_kept_until_its_zero_copy_socket_has_sent_everything() {
    let mut w = writer();
    let slot_fd = iotlb_shm::slots::create(2, 2).unwrap();
    let id = w
        .register_process(slot_fd.as_fd(), exited_process())
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut receiver, _) = listener.accept().unwrap();
    let tcp = drain::tcp_endpoints(sender.as_fd()).unwrap();
    w.track_io(id, TrackedIo::Socket(tcp)).unwrap();
    // Queue more than the receiver takes, then close the sending socket as
    // a dying process would: the kernel keeps the queue (orphaned socket).
    sender.set_nonblocking(true).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut sent = 0;
    while let Ok(n) = sender.write(&chunk) {
        sent += n;
        if sent > 16 << 20 {
            break;
        }
    }
    drop(sender);
    assert!(matches!(
        w.try_release_reader(id),
        Some(ReaderState::Draining { pending: 1 })
    ));
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = receiver.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, sent);
    wait_released(&mut w, id);
}

#[test]
fn only_connected_tcp_sockets_in_this_namespace_are_tracked() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(drain::tcp_endpoints(udp.as_fd()).is_err(), "UDP");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(
        drain::tcp_endpoints(listener.as_fd()).is_err(),
        "not connected"
    );
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(drain::tcp_endpoints(a.as_fd()).is_err(), "AF_UNIX");
    let file = std::fs::File::open("/dev/null").unwrap();
    assert!(drain::tcp_endpoints(file.as_fd()).is_err(), "not a socket");
}

/// Dropping the writer marks the table detached: every session that
/// begins afterwards faults, even where the last leaf was cached.
#[test]
fn a_dropped_writer_detaches_every_reader() {
    let w = writer();
    let table = TableReader::open(w.table_fd(), w.arena_fd()).unwrap();
    let slot_fd = iotlb_shm::slots::create(2, 2).unwrap();
    let file = SlotFile::open(slot_fd.as_fd()).unwrap();
    let mut slot = file.claim_slot().unwrap();
    assert!(table.writer_alive());
    {
        let s = slot.enter(&table);
        assert_eq!(
            s.translate_one(8, 0x1234, Access::READ).unwrap().gpa,
            0x8234
        );
    }
    drop(w);
    assert!(!table.writer_alive());
    let s = slot.enter(&table);
    assert!(!s.writer_alive());
    assert_eq!(
        s.translate_one(8, 0x1234, Access::READ).map_err(|f| f.kind),
        Err(FaultKind::Detached)
    );
    assert_eq!(
        s.translate(8, 0x1000, 0x100, Access::READ)
            .next()
            .map(|p| p.map_err(|f| f.kind)),
        Some(Err(FaultKind::Detached))
    );
    assert!(s.pin(8, 0x1000, 0x100, Access::READ).is_err());
}

/// A table that outlives its writer (`WriterConfig::handover`, the daemon's
/// `--state-dir`) goes on translating, frozen, once the writer is gone —
/// until the reader retires its slot file: sessions entered after that
/// fault, sessions entered before keep what they translated.
#[test]
fn a_handover_table_translates_after_its_writer_until_the_slot_file_is_retired() {
    let w = writer_with(true);
    let table = TableReader::open(w.table_fd(), w.arena_fd()).unwrap();
    assert!(table.handed_over());
    let slot_fd = iotlb_shm::slots::create(2, 2).unwrap();
    let file = SlotFile::open(slot_fd.as_fd()).unwrap();
    let (mut a, mut b) = (file.claim_slot().unwrap(), file.claim_slot().unwrap());
    drop(w);
    assert!(!table.writer_alive());
    let before = a.enter(&table);
    assert!(before.writer_alive());
    assert_eq!(
        before.translate_one(8, 0x1234, Access::READ).unwrap().gpa,
        0x8234
    );
    let pin = before.pin(8, 0x1000, 0x100, Access::READ).unwrap();
    file.retire();
    assert!(file.retired());
    // Open before the retirement: still translates.
    assert_eq!(
        before.translate_one(8, 0x1100, Access::READ).unwrap().gpa,
        0x8100
    );
    let after = b.enter(&table);
    assert!(!after.writer_alive());
    assert_eq!(
        after
            .translate_one(8, 0x1234, Access::READ)
            .map_err(|f| f.kind),
        Err(FaultKind::Detached)
    );
    drop((after, before, pin));
}

/// A slot file of a previous writer, handed over to the next one after it
/// was retired, is released once nothing is left in it: sessions and pins
/// of any epoch hold it. A file that was not retired is not released when
/// idle (its process may start a session at any time).
#[test]
fn a_previous_slot_file_is_released_once_retired_and_idle() {
    let mut w = writer();
    let previous = writer_with(true);
    let old_table = TableReader::open(previous.table_fd(), previous.arena_fd()).unwrap();
    let slot_fd = iotlb_shm::slots::create(2, 2).unwrap();
    let file = SlotFile::open(slot_fd.as_fd()).unwrap();
    let me = std::process::id() as i32;

    let id = w
        .register_previous(slot_fd.as_fd(), ReaderProcess::watch(me).unwrap(), None)
        .unwrap();
    assert_eq!(w.previous_readers(), 1);
    assert_eq!(w.release_previous_readers(), 1, "not retired: kept");

    let mut slot = file.claim_slot().unwrap();
    let session = slot.enter(&old_table);
    let pin = session.pin(8, 0x1000, 0x1000, Access::READ).unwrap();
    file.retire();
    assert_eq!(w.release_previous_readers(), 1, "a session is open");
    drop(session);
    assert_eq!(w.release_previous_readers(), 1, "a pin is held");
    drop(pin);
    assert_eq!(w.release_previous_readers(), 0);
    assert_eq!(w.try_release_reader(id), None, "already released");
    drop(slot);
    drop(previous);
}
