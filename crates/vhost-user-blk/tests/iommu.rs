//! The block backend behind the IOMMU, end to end: the real daemon, the real
//! backend (table and message mode), the frontend as QEMU plus a Linux
//! guest, and a FUSE disk whose reads wait for the test, to hold I/O in
//! flight while the guest revokes its buffers.
//!
//! The binary re-executes itself as a misbehaving message-mode backend
//! (`VUBLK_TEST_ROLE`), hence its own `main`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Blk, Iommu, Scratch};
use iotlb_shm::backend_proto::{self, MAX_LEN, Message};
use viommu_frontend::blk::{BlkOptions, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use viommu_frontend::blk_load::{BlkVm, LoadOptions, VmOptions};
use viommu_frontend::blk_queue::{BlkRequest, Buf, Completion};
use viommu_frontend::driver::{Driver, DriverOptions};
use viommu_frontend::guest_dma::Policy;
use viommu_test_support::cases::{Case, run_cases};
use viommu_test_support::fuse::{FuseDisk, HeldRead};
use virtio_iommu_proto::{Attach, FaultReason, Map, MapFlags, Request, Status, Unmap};
use vm_memory::{Bytes, GuestAddress};

const EP: u32 = 8;
const RAM: u64 = 256 << 20;
const ROLE: &str = "VUBLK_TEST_ROLE";
/// How long a request must stay pending to count as "held back".
const HELD: Duration = Duration::from_millis(500);

fn root() -> Result<(), String> {
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        return Err("needs root (FUSE)".into());
    }
    Ok(())
}

fn vm(iommu: &Iommu, blk: &Blk, policy: Policy) -> BlkVm {
    BlkVm::start(&VmOptions {
        blk_socket: blk.socket.clone(),
        iommu_socket: Some(iommu.vmm.clone()),
        policy,
        endpoint: EP,
        domain: 1,
        ram_size: RAM,
        blk: BlkOptions::default(),
    })
    .unwrap()
}

fn backend(dir: &Scratch, disk: &Path, mode: &str, extra: &[&str]) -> Blk {
    let mut args = vec![
        "--blk-file",
        disk.to_str().unwrap(),
        "--iommu",
        mode,
        "--endpoint",
        "8",
    ];
    args.extend_from_slice(extra);
    Blk::start(dir, &args)
}

/// One read request of `len` bytes at sector 0, its buffers mapped by the
/// VM's policy; `data_iova` overrides the data buffer's device address.
fn read_request(vm: &mut BlkVm, len: u32, data_iova: Option<u64>) -> BlkRequest {
    let ram = vm.guest.ram();
    let meta = ram.alloc(4096, 4096).unwrap().0;
    let data = ram.alloc(u64::from(len), 4096).unwrap().0;
    let header = Buf {
        dev: vm.dma.map(vm.guest.iommu(), meta, 16, false).unwrap(),
        gpa: meta,
        len: 16,
    };
    let status = Buf {
        dev: vm.dma.map(vm.guest.iommu(), meta + 64, 1, true).unwrap(),
        gpa: meta + 64,
        len: 1,
    };
    let data = Buf {
        dev: match data_iova {
            Some(iova) => iova,
            None => vm
                .dma
                .map(vm.guest.iommu(), data, u64::from(len), true)
                .unwrap(),
        },
        gpa: data,
        len,
    };
    BlkRequest {
        kind: VIRTIO_BLK_T_IN,
        sector: 0,
        header,
        data: vec![(data, true)],
        status,
    }
}

fn post(vm: &mut BlkVm, req: &BlkRequest, tag: usize) {
    let mem = vm.dev.mem().clone();
    vm.dev.queue(0).post(&mem, req, tag).unwrap();
    vm.dev.publish(0).unwrap();
}

/// Waits (bounded) for the next completion on queue 0.
fn complete(vm: &mut BlkVm, limit: Duration) -> Completion {
    let mem = vm.dev.mem().clone();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(c) = vm.dev.queue(0).pop(&mem).unwrap() {
            return c;
        }
        assert!(Instant::now() < deadline, "no completion within {limit:?}");
        vm.dev
            .wait(Duration::ZERO, Duration::from_millis(50))
            .unwrap();
    }
}

fn status_of(vm: &BlkVm, req: &BlkRequest) -> u8 {
    let mut b = [0u8; 1];
    vm.dev
        .mem()
        .read_slice(&mut b, GuestAddress(req.status.gpa))
        .unwrap();
    b[0]
}

fn unmap_req(iova: u64, len: u64) -> Request {
    let first = iova & !0xfff;
    Request::Unmap(Unmap {
        domain: 1,
        virt_start: first,
        virt_end: (iova + len).div_ceil(4096) * 4096 - 1,
        reserved: [0; 4],
    })
}

/// Sends `req` to the IOMMU on another thread; reports whether it
/// completed within [`HELD`], runs `meanwhile` if not, then waits for it.
fn racing(iommu: &mut Driver, req: Request, meanwhile: impl FnOnce()) -> (bool, Option<Status>) {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let _ = tx.send(iommu.send_one(&req).unwrap().status());
        });
        match rx.recv_timeout(HELD) {
            Ok(st) => (true, st),
            Err(_) => {
                meanwhile();
                (
                    false,
                    rx.recv_timeout(Duration::from_secs(10))
                        .expect("never completed"),
                )
            }
        }
    })
}

/// Answers every READ the FUSE disk gets with `byte`, from now on, on a
/// thread of its own (buffered reads come with read-ahead).
fn answer_all(disk: &FuseDisk, first: Vec<HeldRead>, byte: u8, until: Duration) {
    for r in &first {
        disk.answer(r, byte);
    }
    let deadline = Instant::now() + until;
    while Instant::now() < deadline {
        if let Some(r) = disk.next_read(Duration::from_millis(20)) {
            disk.answer(&r, byte);
        }
    }
}

// ------------------------------------------------------------------ tests

/// A data descriptor at an IOVA the guest never mapped: the request fails
/// with IOERR (nothing read or written through it), a fault record reaches
/// the guest's event queue, and the queue keeps serving.
fn an_unmapped_iova_fails_with_ioerr_and_a_fault_reaches_the_event_queue() {
    let dir = Scratch::new("fault");
    let iommu = Iommu::start(&dir, &[]);
    let img = dir.image("disk.img", 16 << 20);
    let blk = backend(&dir, &img, &iommu.mode(), &[]);
    let mut vm = vm(&iommu, &blk, Policy::Strict);
    vm.guest.iommu().unwrap().post_event_buffers(4, 24).unwrap();
    let bad_iova = RAM + 0x10_0000;
    let req = read_request(&mut vm, 4096, Some(bad_iova));
    post(&mut vm, &req, 1);
    let c = complete(&mut vm, Duration::from_secs(5));
    assert_eq!((c.tag, c.used_len), (1, 1), "IOERR, no data counted");
    assert_eq!(status_of(&vm, &req), VIRTIO_BLK_S_IOERR);
    let events = vm
        .guest
        .iommu()
        .unwrap()
        .take_events(Duration::from_secs(5))
        .unwrap();
    let rec = events
        .iter()
        .find_map(|e| e.record)
        .unwrap_or_else(|| panic!("no fault record: {events:?}"));
    assert_eq!(rec.endpoint, EP);
    assert_eq!(rec.address, Some(bad_iova));
    assert_eq!(rec.reason, FaultReason::Mapping);
    let ok = read_request(&mut vm, 4096, None);
    post(&mut vm, &ok, 2);
    assert_eq!(complete(&mut vm, Duration::from_secs(5)).used_len, 4097);
    assert_eq!(status_of(&vm, &ok), VIRTIO_BLK_S_OK);
}

/// The guest unmaps a buffer while the backend's read into it is in flight
/// (the FUSE disk holds it): the UNMAP completes only after the read has
/// landed, in table mode and in message mode.
fn an_unmap_waits_for_the_io_in_flight_on_its_buffer(mode: &str) -> Result<(), String> {
    root()?;
    let dir = Scratch::new(&format!("inflight-{mode}"));
    let iommu = Iommu::start(&dir, &[]);
    let disk = FuseDisk::mount(&dir.path("mnt"), 1 << 20)?;
    let mode = match mode {
        "table" => iommu.mode(),
        _ => format!("iotlb-msg:{}", iommu.backends.display()),
    };
    let blk = backend(&dir, &disk.file(), &mode, &[]);
    let mut vm = vm(&iommu, &blk, Policy::Strict);
    let req = read_request(&mut vm, 4096, None);
    post(&mut vm, &req, 1);
    let first = disk
        .next_read(Duration::from_secs(5))
        .ok_or("the read never reached the disk")?;
    let data = req.data[0].0;
    let mem = vm.dev.mem().clone();
    let BlkVm { guest, .. } = &mut vm;
    let (early, status) = racing(guest.iommu().unwrap(), unmap_req(data.dev, 4096), || {
        answer_all(&disk, vec![first], b'F', Duration::from_millis(300));
    });
    assert!(
        !early,
        "UNMAP completed while the backend's read into the buffer was in flight"
    );
    assert_eq!(status, Some(Status::Ok));
    let mut page = vec![0u8; 4096];
    mem.read_slice(&mut page, GuestAddress(data.gpa)).unwrap();
    assert!(
        page.iter().all(|&b| b == b'F'),
        "the read landed before the UNMAP completed"
    );
    let c = complete(&mut vm, Duration::from_secs(5));
    assert_eq!(c.used_len, 4097);
    assert_eq!(status_of(&vm, &req), VIRTIO_BLK_S_OK);
    Ok(())
}

/// The backend is killed with -9 while its reads are in flight: the UNMAPs
/// of their buffers wait for the reads to drain (the kernel still writes
/// the pages), and complete as soon as they have — a dead backend holds
/// nothing back beyond that.
fn a_backend_killed_during_io_holds_the_unmap_only_until_its_io_drained() -> Result<(), String> {
    root()?;
    let dir = Scratch::new("kill");
    let iommu = Iommu::start(&dir, &[]);
    let disk = FuseDisk::mount(&dir.path("mnt"), 1 << 20)?;
    // O_DIRECT: the read goes to the FUSE server as async direct I/O, which
    // stays in flight after the process is gone (a buffered read through
    // io-wq is interrupted by the kill instead).
    let mut blk = backend(&dir, &disk.file(), &iommu.mode(), &["--direct"]);
    let mut vm = vm(&iommu, &blk, Policy::Strict);
    let req = read_request(&mut vm, 4096, None);
    post(&mut vm, &req, 1);
    let first = disk
        .next_read(Duration::from_secs(5))
        .ok_or("the read never reached the disk")?;
    blk.proc.kill9();
    let BlkVm { guest, .. } = &mut vm;
    let start = Instant::now();
    let (early, status) = racing(
        guest.iommu().unwrap(),
        unmap_req(req.data[0].0.dev, 4096),
        || {
            answer_all(&disk, vec![first], b'K', Duration::from_millis(300));
        },
    );
    assert!(
        !early,
        "UNMAP completed while the dead backend's read was in flight"
    );
    assert_eq!(status, Some(Status::Ok));
    assert!(start.elapsed() < Duration::from_secs(10));
    iommu.proc.wait_for_log("released", Duration::from_secs(5));
    Ok(())
}

/// A VMM that disconnects and a new one that connects: the device, its
/// engines and its connection to the daemon carry on.
fn a_vmm_reconnect_works_in_table_mode() {
    let dir = Scratch::new("reconnect");
    let iommu = Iommu::start(&dir, &[]);
    let img = dir.image("disk.img", 16 << 20);
    let blk = backend(&dir, &img, &iommu.mode(), &["--num-queues", "2"]);
    for round in 0..3 {
        let mut vm = vm(&iommu, &blk, Policy::Lazy);
        let r = vm.run(&verified_mix(500, round + 1)).unwrap();
        assert_eq!((r.errors, r.mismatches), (0, 0), "round {round}");
        assert!(r.reads > 0 && r.writes > 0);
    }
}

/// `count` requests, half reads, over 64 blocks, every read verified.
fn verified_mix(count: u64, seed: u64) -> LoadOptions {
    LoadOptions {
        depth: 8,
        read_percent: 50,
        count: Some(count),
        span_blocks: Some(64),
        verify: true,
        seed,
        ..LoadOptions::default()
    }
}

/// `stop`/`cont` as QEMU sends them, with the rings at IOVAs: the backend
/// resumes where the rings say (its used index read through the IOMMU, not
/// at the ring IOVA taken as guest-physical), every read verified.
fn a_pause_and_resume_keeps_the_queues_behind_the_iommu() {
    let dir = Scratch::new("pause");
    let iommu = Iommu::start(&dir, &[]);
    let img = dir.image("disk.img", 16 << 20);
    let blk = backend(&dir, &img, &iommu.mode(), &["--num-queues", "2"]);
    let mut vm = vm(&iommu, &blk, Policy::Strict);
    for round in 0..3 {
        let r = vm.run(&verified_mix(300, round + 1)).unwrap();
        assert_eq!((r.errors, r.mismatches), (0, 0), "round {round}");
        assert!(r.reads > 0 && r.writes > 0);
        vm.pause_and_resume().unwrap();
    }
}

/// Fewer pin records than the I/O in flight needs: requests wait in the
/// ring for a completion to free one, none fails, every read verified.
fn requests_wait_for_pin_records_instead_of_failing() {
    let dir = Scratch::new("pins");
    let iommu = Iommu::start(&dir, &[]);
    let img = dir.image("disk.img", 16 << 20);
    let blk = backend(&dir, &img, &iommu.mode(), &["--pin-records", "4"]);
    let mut vm = vm(&iommu, &blk, Policy::Strict);
    let r = vm
        .run(&LoadOptions {
            depth: 32,
            ..verified_mix(2000, 7)
        })
        .unwrap();
    assert_eq!((r.errors, r.mismatches), (0, 0));
    drop(vm);
    blk.proc
        .wait_for_log("VMM connection over", Duration::from_secs(10));
    let log = blk.proc.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("VMM connection over"))
        .unwrap();
    assert!(line.contains("failed=0"), "{line}");
    assert!(
        !line.contains("waited_for_pins=0 "),
        "no request had to wait: {line}"
    );
}

/// The daemon dies (-9) under a running backend: a request posted after
/// that moves no data through the dead daemon's table, the backend lives
/// on, and once a new daemon is up at the same sockets the backend
/// connects to it and the next VMM's I/O works.
fn a_daemon_that_dies_fails_closed_and_a_new_one_is_picked_up() {
    let dir = Scratch::new("daemon-death");
    let mut iommu = Iommu::start(&dir, &[]);
    let img = dir.image("disk.img", 16 << 20);
    let blk = backend(&dir, &img, &iommu.mode(), &[]);
    let load = LoadOptions {
        depth: 4,
        read_percent: 50,
        count: Some(200),
        span_blocks: Some(64),
        verify: true,
        ..LoadOptions::default()
    };
    {
        let mut vm = vm(&iommu, &blk, Policy::Strict);
        let r = vm.run(&load).unwrap();
        assert_eq!((r.errors, r.mismatches), (0, 0));
        let req = read_request(&mut vm, 4096, None);
        let data = GuestAddress(req.data[0].0.gpa);
        vm.dev.mem().write_slice(&[0x5a; 4096], data).unwrap();
        iommu.proc.kill9();
        post(&mut vm, &req, 1);
        std::thread::sleep(HELD);
        let mut after = [0u8; 4096];
        vm.dev.mem().read_slice(&mut after, data).unwrap();
        assert!(
            after.iter().all(|&b| b == 0x5a),
            "the backend read into guest memory through a dead daemon's table"
        );
        let mem = vm.dev.mem().clone();
        if vm.dev.queue(0).pop(&mem).unwrap().is_some() {
            assert_eq!(status_of(&vm, &req), VIRTIO_BLK_S_IOERR);
        }
    }
    blk.proc
        .wait_for_log("VMM connection over", Duration::from_secs(5));
    let _ = std::fs::remove_file(&iommu.vmm);
    let _ = std::fs::remove_file(&iommu.backends);
    let iommu = Iommu::start(&dir, &[]);
    let mut vm = vm(&iommu, &blk, Policy::Strict);
    let r = vm.run(&load).unwrap_or_else(|e| {
        panic!(
            "{e}\nbackend:\n{}\ndaemon:\n{}",
            blk.proc.log_text(),
            iommu.proc.log_text()
        )
    });
    assert_eq!((r.errors, r.mismatches), (0, 0));
    assert!(
        blk.proc
            .log_text()
            .contains("connected to the restarted vhost-user-iommu daemon"),
        "{}",
        blk.proc.log_text()
    );
}

/// Message mode resolves misses with the daemon and gets invalidations:
/// the backend reports both after the VMM leaves.
fn message_mode_resolves_misses_and_applies_invalidations() {
    let dir = Scratch::new("msg");
    let iommu = Iommu::start(&dir, &[]);
    let img = dir.image("disk.img", 16 << 20);
    let mode = format!("iotlb-msg:{}", iommu.backends.display());
    let blk = backend(&dir, &img, &mode, &[]);
    {
        let mut vm = vm(&iommu, &blk, Policy::Strict);
        let r = vm
            .run(&LoadOptions {
                depth: 4,
                read_percent: 50,
                count: Some(300),
                span_blocks: Some(32),
                verify: true,
                ..LoadOptions::default()
            })
            .unwrap();
        assert_eq!((r.errors, r.mismatches), (0, 0));
    }
    blk.proc
        .wait_for_log("VMM connection over", Duration::from_secs(5));
    let log = blk.proc.log_text();
    let field = |name: &str| -> u64 {
        log.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {log}"))
    };
    // Strict unmaps every buffer after use: every request misses.
    assert!(field("iotlb_misses") >= 300, "{log}");
    assert!(field("invalidations") >= 300, "{log}");
}

/// A message-mode backend that never acknowledges invalidations: the UNMAP
/// waits, and the stall policy kills it; without a kill policy the UNMAP
/// waits until the backend is gone.
fn a_message_mode_backend_that_never_acknowledges_is_handled_by_the_stall_policy() {
    for kill in [true, false] {
        let dir = Scratch::new(&format!("noack-{kill}"));
        // Bypass off: the ATTACH below widens access and needs no
        // invalidation; the UNMAP is the first revocation.
        let extra: &[&str] = if kill {
            &[
                "--bypass",
                "off",
                "--stall-warn-ms",
                "50",
                "--stall-kill-ms",
                "1000",
            ]
        } else {
            &["--bypass", "off", "--stall-warn-ms", "50"]
        };
        let iommu = Iommu::start(&dir, extra);
        let mut role = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, &iommu.backends)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(role.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "subscribed");
        let mut drv = Driver::connect(
            &iommu.vmm,
            DriverOptions {
                ram_size: 64 << 20,
                ..DriverOptions::default()
            },
        )
        .unwrap();
        let attach = Request::Attach(Attach {
            domain: 1,
            endpoint: EP,
            flags: 0,
            reserved: [0; 4],
        });
        assert_eq!(drv.send_one(&attach).unwrap().status(), Some(Status::Ok));
        let map = Request::Map(Map {
            domain: 1,
            virt_start: 0x10_0000,
            virt_end: 0x10_0fff,
            phys_start: 0x8000,
            flags: MapFlags::READ,
        });
        assert_eq!(drv.send_one(&map).unwrap().status(), Some(Status::Ok));
        let started = Instant::now();
        let (early, status) = racing(&mut drv, unmap_req(0x10_0000, 4096), || {
            if !kill {
                let _ = role.kill();
            }
        });
        assert!(
            !early,
            "UNMAP completed without the backend's acknowledgement:\n{}",
            iommu.proc.log_text()
        );
        assert_eq!(status, Some(Status::Ok));
        let died = role.wait().unwrap();
        if kill {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                died.signal(),
                Some(libc::SIGKILL),
                "the stall policy killed it"
            );
            assert!(started.elapsed() >= Duration::from_millis(1000));
            iommu
                .proc
                .wait_for_log("killed a message-mode backend", Duration::from_secs(5));
        }
        assert!(
            iommu
                .proc
                .log_text()
                .contains("has not acknowledged an invalidation")
        );
    }
}

/// The misbehaving backend: subscribes to invalidations, then reads them
/// and never acknowledges.
fn never_acknowledging_backend(socket: &str) -> ! {
    let client = iotlb_shm::BackendClient::connect(Path::new(socket), 1, 1).unwrap();
    let sock = client.connection();
    backend_proto::send_with_fds(sock, &Message::IotlbSubscribe { cookie: 1 }.encode(), &[])
        .unwrap();
    let mut buf = [0u8; MAX_LEN];
    let answer = backend_proto::recv_message(sock, &mut buf).unwrap();
    assert!(
        matches!(answer, Some((Message::Ack { cookie: 1 }, _))),
        "{answer:?}"
    );
    println!("subscribed");
    while let Ok(Some(_)) = backend_proto::recv_message(sock, &mut buf) {}
    std::process::exit(0)
}

fn main() {
    if let Ok(socket) = std::env::var(ROLE) {
        never_acknowledging_backend(&socket);
    }
    let cases: &[Case] = &[
        (
            "an_unmapped_iova_fails_with_ioerr_and_a_fault_reaches_the_event_queue",
            || {
                an_unmapped_iova_fails_with_ioerr_and_a_fault_reaches_the_event_queue();
                Ok(())
            },
        ),
        (
            "an_unmap_waits_for_the_io_in_flight_on_its_buffer_in_table_mode",
            || an_unmap_waits_for_the_io_in_flight_on_its_buffer("table"),
        ),
        (
            "an_unmap_waits_for_the_io_in_flight_on_its_buffer_in_message_mode",
            || an_unmap_waits_for_the_io_in_flight_on_its_buffer("msg"),
        ),
        (
            "a_backend_killed_during_io_holds_the_unmap_only_until_its_io_drained",
            a_backend_killed_during_io_holds_the_unmap_only_until_its_io_drained,
        ),
        ("a_vmm_reconnect_works_in_table_mode", || {
            a_vmm_reconnect_works_in_table_mode();
            Ok(())
        }),
        ("requests_wait_for_pin_records_instead_of_failing", || {
            requests_wait_for_pin_records_instead_of_failing();
            Ok(())
        }),
        (
            "a_pause_and_resume_keeps_the_queues_behind_the_iommu",
            || {
                a_pause_and_resume_keeps_the_queues_behind_the_iommu();
                Ok(())
            },
        ),
        (
            "a_daemon_that_dies_fails_closed_and_a_new_one_is_picked_up",
            || {
                a_daemon_that_dies_fails_closed_and_a_new_one_is_picked_up();
                Ok(())
            },
        ),
        (
            "message_mode_resolves_misses_and_applies_invalidations",
            || {
                message_mode_resolves_misses_and_applies_invalidations();
                Ok(())
            },
        ),
        (
            "a_message_mode_backend_that_never_acknowledges_is_handled_by_the_stall_policy",
            || {
                a_message_mode_backend_that_never_acknowledges_is_handled_by_the_stall_policy();
                Ok(())
            },
        ),
    ];
    run_cases("block IOMMU", cases);
}
