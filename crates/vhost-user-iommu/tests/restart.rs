//! A daemon restarted on its `--state-dir` carries on with the guest's
//! device state: the real daemon is killed with SIGKILL while requests are
//! in flight, started again on the same directory, and the VMM stand-in
//! reconnects as QEMU does (same guest memory and rings, each ring resumed
//! at its used index).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::backends::{
    Backend, Daemon, EP, attach, map, ok, request_racing, run_cases, scratch, unmap,
};
use iotlb_shm::BackendClient;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use viommu_frontend::driver::Driver;
use virtio_iommu_proto::Status;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
/// Mappings completed before the kill.
const SETTLED: u64 = 300;
/// Mappings posted just before the kill, not waited for.
const IN_FLIGHT: u64 = 200;

fn start(dir: &Path) -> Daemon {
    let state = dir.join("state");
    Daemon::start_in(
        dir,
        BIN.as_ref(),
        None,
        &["--state-dir", state.to_str().unwrap()],
    )
}

fn iova(i: u64) -> u64 {
    0x10_0000 + i * 0x1000
}

fn gpa(i: u64) -> u64 {
    0x20_0000 + i * 0x1000
}

/// Kills the daemon with SIGKILL and removes its socket files (which a
/// killed process leaves behind; the next daemon would replace them, but
/// the test must not connect to them before it has).
fn kill9(d: &mut Daemon) {
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let _ = std::fs::remove_file(&d.vmm);
    let _ = std::fs::remove_file(&d.backends);
}

/// Posts a MAP of each page of `pages`, not waiting for them (a full
/// queue waits for one completion, which must be OK).
fn post_maps(drv: &mut Driver, pages: std::ops::Range<u64>) {
    let specs: Vec<_> = pages
        .map(|i| drv.chain_spec(&map(1, iova(i), gpa(i))))
        .collect();
    let mut posted = 0;
    while posted < specs.len() {
        posted += drv.post_batch(&specs[posted..], posted).unwrap();
        if posted < specs.len() {
            drv.collect(1, |i, o| {
                assert_eq!(o.status(), Some(Status::Ok), "request {i}");
            })
            .unwrap();
        }
    }
}

/// Every completed status of the requests still in flight.
fn collect_all(drv: &mut Driver) -> Vec<(usize, Option<Status>)> {
    let mut out = Vec::new();
    let n = drv.in_flight();
    drv.collect(n, |i, o| out.push((i, o.status()))).unwrap();
    out
}

/// What the shared table of the daemon listening at `backends` says
/// IOVA page `i` translates to.
fn translate(client: &BackendClient, i: u64) -> Option<u64> {
    match client.lookup(EP, iova(i), 0x1000).unwrap().first() {
        Some(Ok((_, p))) => Some(p.gpa),
        _ => None,
    }
}

fn a_daemon_killed_mid_batch_and_restarted_keeps_every_mapping_and_completes_the_batch() {
    let dir = scratch("restart-kill9");
    let mut d = start(&dir);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    let settled: Vec<_> = (0..SETTLED).map(|i| map(1, iova(i), gpa(i))).collect();
    for chunk in settled.chunks(32) {
        for o in drv.send(chunk).unwrap() {
            assert_eq!(o.status(), Some(Status::Ok));
        }
    }
    // A batch the daemon is working on when it dies.
    post_maps(&mut drv, SETTLED..SETTLED + IN_FLIGHT);
    let killed_at = Instant::now();
    kill9(&mut d);
    let outstanding = drv.in_flight();

    let d = start(&dir);
    drv.reconnect(&d.vmm).unwrap();
    let done = collect_all(&mut drv);
    let waited = killed_at.elapsed();
    assert_eq!(done.len(), outstanding);
    for (i, status) in &done {
        assert_eq!(
            *status,
            Some(Status::Ok),
            "request {i} of the interrupted batch, after the restart"
        );
    }
    let log = d.log();
    assert!(log.contains("device state restored"), "{log}");
    eprintln!(
        "{outstanding} requests were outstanding at the kill; all completed {:?} after it",
        waited
    );

    // Every mapping, settled or in the interrupted batch, is in the new
    // daemon's table, to the same address.
    let client = BackendClient::connect(&d.backends, 1, 0).unwrap();
    for i in 0..SETTLED + IN_FLIGHT {
        assert_eq!(translate(&client, i), Some(gpa(i)), "IOVA page {i}");
    }
    // ...and in its model: mapping any of them again overlaps.
    for i in [0, SETTLED - 1, SETTLED, SETTLED + IN_FLIGHT - 1] {
        let again = drv.send_one(&map(1, iova(i), gpa(i))).unwrap().status();
        assert_ne!(again, Some(Status::Ok), "page {i} was mapped twice");
    }
    // The device goes on: an UNMAP completes and the translation is gone.
    ok(&mut drv, unmap(1, iova(7)));
    assert_eq!(translate(&client, 7), None);
    assert_eq!(translate(&client, 8), Some(gpa(8)));
}

fn a_restart_after_a_clean_stop_keeps_the_state_too() {
    let dir = scratch("restart-sigterm");
    let mut d = start(&dir);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, iova(0), gpa(0)));
    // systemctl restart: SIGTERM, then a new process.
    // SAFETY: kill() on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    assert!(d.child.wait().unwrap().success());
    let d = start(&dir);
    drv.reconnect(&d.vmm).unwrap();
    let client = BackendClient::connect(&d.backends, 1, 0).unwrap();
    assert_eq!(translate(&client, 0), Some(gpa(0)));
    assert_ne!(
        drv.send_one(&map(1, iova(0), gpa(0))).unwrap().status(),
        Some(Status::Ok)
    );
}

fn a_new_guest_after_the_restart_gets_a_fresh_device() {
    let dir = scratch("restart-new-guest");
    let mut d = start(&dir);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, iova(0), gpa(0)));
    kill9(&mut d);
    drop(drv);
    let d = start(&dir);
    // A new VMM and guest: its driver reads the config space before it
    // starts the device, which a running guest never does. The saved state
    // is another guest's and goes.
    let mut drv = d.driver();
    let client = BackendClient::connect(&d.backends, 1, 0).unwrap();
    // Unattached again, the endpoint bypasses (the configured default).
    assert_eq!(translate(&client, 0), Some(iova(0)), "{}", d.log());
    assert_eq!(
        drv.send_one(&map(1, iova(0), gpa(0))).unwrap().status(),
        Some(Status::NoEnt),
        "domain 1 must not exist on a fresh device"
    );
    assert!(d.log().contains("device reset detected"), "{}", d.log());
}

/// Runs the daemon on `dir`'s state and returns its exit code and log.
fn run_on_state(dir: &Path) -> (Option<i32>, String) {
    let state: PathBuf = dir.join("state");
    let out = Command::new(BIN)
        .arg("--socket-path")
        .arg(dir.join("other.sock"))
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn a_corrupt_truncated_or_foreign_state_is_refused_and_the_daemon_exits() {
    let dir = scratch("restart-refused");
    let mut d = start(&dir);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    for i in 0..4 {
        ok(&mut drv, map(1, iova(i), gpa(i)));
    }
    kill9(&mut d);
    let file = dir.join("state").join("device-state");
    let good = std::fs::read(&file).unwrap();
    let len = good.iter().rposition(|&b| b != 0).unwrap() + 1;

    // A byte changed in the middle.
    let mut bad = good.clone();
    bad[len / 2] ^= 0x10;
    std::fs::write(&file, &bad).unwrap();
    let (code, log) = run_on_state(&dir);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("refusing the saved device state"), "{log}");
    assert!(log.contains("device-state"), "{log}");

    // Another format version.
    let mut bad = good.clone();
    bad[8] = 9;
    std::fs::write(&file, &bad).unwrap();
    let (code, log) = run_on_state(&dir);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("version 9"), "{log}");

    // Cut inside the header.
    std::fs::write(&file, &good[..20]).unwrap();
    let (code, log) = run_on_state(&dir);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("shorter than its 32-byte header"), "{log}");

    // A daemon configured differently.
    std::fs::write(&file, &good).unwrap();
    let out = Command::new(BIN)
        .arg("--socket-path")
        .arg(dir.join("other.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--max-domains", "7"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("configured differently"), "{log}");
    // The state is left where it was for the operator to look at.
    assert_eq!(std::fs::read(&file).unwrap(), good);

    // Two daemons never share a state directory.
    std::fs::write(&file, &good).unwrap();
    let first = start(&dir);
    let (code, log) = run_on_state(&dir);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("in use by another"), "{log}");
    drop(first);
}

/// An UNMAP held by a backend's session is applied (and saved) but not
/// completed; the MAP after it in the same batch is applied too, and waits
/// behind it. Killed then: the next daemon must complete both without
/// applying them again — applied again, the MAP would overlap itself.
fn requests_applied_but_not_completed_at_the_kill_complete_without_applying_again() {
    let dir = scratch("restart-applied");
    let mut d = start(&dir);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, iova(0), gpa(0)));
    // Connected first: a backend cannot register while a grace period
    // waits (the writer is busy with it).
    let client = BackendClient::connect(&d.backends, 1, 0).unwrap();
    let mut holder = Backend::spawn(&d.backends, None);
    let hello = holder.line();
    assert!(hello.starts_with("connected"), "{hello}");
    let seen = holder.ask(&format!("enter {EP:#x} {:#x}", iova(0)));
    assert!(seen.contains(&format!("{:#x}", gpa(0))), "{seen}");
    let specs = [
        drv.chain_spec(&unmap(1, iova(0))),
        drv.chain_spec(&map(1, iova(1), gpa(1))),
    ];
    assert_eq!(drv.post_batch(&specs, 0).unwrap(), 2);
    // The MAP is applied (its translation is published at once) while the
    // UNMAP before it waits for the holder.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while translate(&client, 1) != Some(gpa(1)) {
        assert!(Instant::now() < deadline, "the MAP was never applied");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        drv.in_flight(),
        2,
        "both wait behind the UNMAP's grace period"
    );
    let replaced = client.reader_id;
    drop(client);
    kill9(&mut d);
    holder.kill9();

    let d = start(&dir);
    // This process was a backend of the killed daemon: the UNMAP completes
    // only once its new connection says it replaces that one and holds
    // nothing of the previous table (the holder was killed; the daemon
    // sees it gone).
    let client = BackendClient::connect(&d.backends, 1, 0).unwrap();
    client.hand_over(&[], &[replaced]).unwrap();
    drv.reconnect(&d.vmm).unwrap();
    let mut done = collect_all(&mut drv);
    done.sort_by_key(|(i, _)| *i);
    assert_eq!(
        done,
        vec![(0, Some(Status::Ok)), (1, Some(Status::Ok))],
        "{}",
        d.log()
    );
    assert_eq!(translate(&client, 0), None);
    assert_eq!(translate(&client, 1), Some(gpa(1)));
}

/// Migration: the VMM takes the state from one daemon
/// (`SET_DEVICE_STATE_FD` save) and gives it to another (load); a state
/// that does not load is refused at `CHECK_DEVICE_STATE` and changes
/// nothing. The `--state-dir` file is the same format.
fn a_state_saved_by_one_daemon_loads_in_another_and_a_tampered_one_is_refused() {
    let dir_a = scratch("migrate-a");
    let mut a = start(&dir_a);
    let mut src = a.driver();
    ok(&mut src, attach(1));
    for i in 0..50 {
        ok(&mut src, map(1, iova(i), gpa(i)));
    }
    // A fault a backend reported that the guest has no event buffer for
    // yet: it travels with the state.
    let reporter = BackendClient::connect(&a.backends, 1, 0).unwrap();
    reporter
        .report_fault(&iotlb_shm::Fault {
            kind: iotlb_shm::FaultKind::Mapping,
            endpoint: EP,
            iova: 0x9000,
            access: iotlb_shm::Access::READ,
        })
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let saved = loop {
        let saved = src.connection().save_device_state().unwrap();
        let r = viommu_core::state::restore(viommu_core::DeviceConfig::default(), &saved).unwrap();
        if !r.faults.is_empty() {
            break saved;
        }
        assert!(
            Instant::now() < deadline,
            "the fault never reached the daemon"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(saved.starts_with(b"VIOMMUST"));
    assert!(a.log().contains("device state saved"), "{}", a.log());

    let dir_b = scratch("migrate-b");
    let b = Daemon::start_in(&dir_b, BIN.as_ref(), None, &[]);
    let mut dst = b.driver();
    let client = BackendClient::connect(&b.backends, 1, 0).unwrap();
    // Fresh: the endpoint bypasses.
    assert_eq!(translate(&client, 3), Some(iova(3)));

    let mut tampered = saved.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    let refused = dst.connection().load_device_state(&tampered);
    assert!(refused.is_err(), "a tampered state was accepted");
    assert_eq!(
        translate(&client, 3),
        Some(iova(3)),
        "the refused state changed the device"
    );
    let cut = &saved[..saved.len() - 8];
    assert!(dst.connection().load_device_state(cut).is_err());

    dst.connection().load_device_state(&saved).unwrap();
    dst.post_event_buffers(2, 64).unwrap();
    let events = dst.take_events(std::time::Duration::from_secs(5)).unwrap();
    let record = events
        .first()
        .and_then(|e| e.record)
        .unwrap_or_else(|| panic!("the fault is not delivered: {events:?}\n{}", b.log()));
    assert_eq!((record.endpoint, record.address), (EP, Some(0x9000)));
    for i in 0..50 {
        assert_eq!(translate(&client, i), Some(gpa(i)), "page {i}");
    }
    assert_ne!(
        dst.send_one(&map(1, iova(0), gpa(0))).unwrap().status(),
        Some(Status::Ok),
        "the model has the mapping too"
    );
    ok(&mut dst, unmap(1, iova(0)));
    assert_eq!(translate(&client, 0), None);

    // The journal a daemon keeps in --state-dir is the same format.
    kill9(&mut a);
    let journal = std::fs::read(dir_a.join("state").join("device-state")).unwrap();
    let dir_c = scratch("migrate-c");
    let c = Daemon::start_in(&dir_c, BIN.as_ref(), None, &[]);
    let mut third = c.driver();
    third.connection().load_device_state(&journal).unwrap();
    let client = BackendClient::connect(&c.backends, 1, 0).unwrap();
    assert_eq!(translate(&client, 49), Some(gpa(49)));
}

// ------------------------------------------------------------ a DMA backend

/// Set (to the backend socket) in a re-executed test binary that plays a
/// backend translating through `viommu_backend::Dma`, the library real
/// backends use: table mode, with its reconnection and hand-over.
const DMA_ROLE_ENV: &str = "VIOMMU_TEST_DMA_BACKEND";
/// IOVA pages the DMA backend's loop translates.
const LOOP_PAGES: u64 = 16;

/// The DMA backend process: one command per stdin line, one answer line.
struct DmaBackend {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl DmaBackend {
    fn spawn(socket: &Path) -> DmaBackend {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(DMA_ROLE_ENV, socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        let mut b = DmaBackend {
            child,
            input,
            output,
        };
        assert_eq!(b.line(), "connected");
        b
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.output.read_line(&mut s).unwrap();
        s.trim().to_string()
    }

    fn ask(&mut self, cmd: &str) -> String {
        self.input.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        self.line()
    }

    /// (translations, faults) of the loop so far.
    fn counts(&mut self) -> (u64, u64) {
        let answer = self.ask("counts");
        let mut w = answer.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        (w.next().unwrap(), w.next().unwrap())
    }
}

impl Drop for DmaBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The DMA backend role: translates IOVA pages 0..LOOP_PAGES of EP in a
/// loop of batches on one thread (counting translations and faults), and
/// holds pins for the test on another.
fn dma_backend_main(socket: &Path) -> ! {
    use viommu_backend::{Access, Dma, DmaOptions, IommuMode};
    let dma = Dma::connect(&DmaOptions {
        mode: IommuMode::Table(socket.to_path_buf()),
        endpoint: EP,
        slots: 4,
        pins: 16,
    })
    .unwrap();
    // Translation needs a memory table; any RAM of the guest's size does.
    let ram =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 64 << 20)])
            .unwrap();
    dma.set_memory(Arc::new(ram));
    let (translations, faults) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let running = Arc::new(AtomicBool::new(false));
    {
        let (dma, translations, faults, running) = (
            dma.clone(),
            Arc::clone(&translations),
            Arc::clone(&faults),
            Arc::clone(&running),
        );
        std::thread::spawn(move || {
            let mut q = dma.queue().unwrap();
            loop {
                if !running.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let batch = q.batch().unwrap();
                for i in 0..LOOP_PAGES {
                    match batch.host_range(iova(i), 0x1000, Access::READ) {
                        Ok(_) => translations.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if faults.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("first fault: {e}");
                            }
                            0
                        }
                    };
                }
                drop(batch);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
    }
    let mut q = dma.queue().unwrap();
    let mut holds = Vec::new();
    println!("connected");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        let answer = match w.as_slice() {
            ["run"] => {
                running.store(true, Ordering::Relaxed);
                "running".to_string()
            }
            ["stop"] => {
                running.store(false, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
                "stopped".to_string()
            }
            ["counts"] => format!(
                "{} {}",
                translations.load(Ordering::Relaxed),
                faults.load(Ordering::Relaxed)
            ),
            ["hold", page] => {
                let batch = q.batch().unwrap();
                let page: u64 = page.parse().unwrap();
                match batch.hold(&[(iova(page), 0x1000)], Access::WRITE, |_, _| {}) {
                    Ok(h) => {
                        holds.push(h);
                        "held".to_string()
                    }
                    Err(e) => format!("fault {e}"),
                }
            }
            ["release"] => {
                holds.clear();
                "released".to_string()
            }
            ["check", first, count] => {
                // How many of the pages translate, in one batch.
                let (first, count): (u64, u64) = (first.parse().unwrap(), count.parse().unwrap());
                let batch = q.batch().unwrap();
                let ok = (first..first + count)
                    .filter(|&i| batch.host_range(iova(i), 0x1000, Access::READ).is_ok())
                    .count();
                ok.to_string()
            }
            _ => "?".to_string(),
        };
        println!("{answer}");
    }
    std::process::exit(0)
}

/// Waits until the loop has made `more` translations past `from`.
fn wait_for_translations(b: &mut DmaBackend, from: u64, more: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (t, f) = b.counts();
        if t >= from + more {
            return (t, f);
        }
        assert!(
            Instant::now() < deadline,
            "the backend stopped translating ({t} translations)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn a_backend_translates_through_a_restart_and_the_next_unmap_waits_for_its_pin() {
    let dir = scratch("restart-backend");
    let mut d = start(&dir);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    for i in 0..LOOP_PAGES {
        ok(&mut drv, map(1, iova(i), gpa(i)));
    }
    let mut b = DmaBackend::spawn(&d.backends);
    assert_eq!(b.ask("run"), "running");
    // A DMA in flight across the restart: page 0 pinned in the first
    // daemon's table.
    assert_eq!(b.ask("hold 0"), "held");
    let (before, faults) = wait_for_translations(&mut b, 0, 1000);
    assert_eq!(faults, 0);

    // Requests flow when the daemon dies: MAPs posted, not waited for.
    const POSTED: u64 = 64;
    post_maps(&mut drv, LOOP_PAGES..LOOP_PAGES + POSTED);
    kill9(&mut d);
    // No daemon runs: the backend goes on translating through the frozen
    // table, which is the guest's view (no UNMAP can complete meanwhile).
    let (during, faults) = wait_for_translations(&mut b, before, 1000);
    assert_eq!(faults, 0, "a translation disappeared while no daemon ran");

    let restarted = Instant::now();
    let d = start(&dir);
    let log = || d.log();
    assert!(
        log().contains("backends of the previous daemon still run"),
        "{}",
        log()
    );
    drv.reconnect(&d.vmm).unwrap();
    for (i, status) in collect_all(&mut drv) {
        assert_eq!(status, Some(Status::Ok), "MAP {i} in flight at the kill");
    }
    d.wait_for_log(
        "backend handed over previous daemons' tables",
        Duration::from_secs(10),
    );
    let handed_over = restarted.elapsed();
    // Translations go on through the new daemon's table.
    let (after, faults) = wait_for_translations(&mut b, during, 1000);
    assert_eq!(faults, 0, "a translation disappeared across the restart");
    // Every mapping is there, those completed after the restart included.
    assert_eq!(
        b.ask(&format!("check 0 {}", LOOP_PAGES + POSTED)),
        (LOOP_PAGES + POSTED).to_string()
    );
    eprintln!(
        "translations: {before} before the kill, {during} without a daemon, {after} after; handed over {handed_over:?} after the restart began"
    );

    // The pin taken in the first daemon's table still holds page 0: the
    // guest's UNMAP of it completes only once the DMA is over.
    assert_eq!(b.ask("stop"), "stopped");
    let (waited, status) = request_racing(
        &mut drv,
        unmap(1, iova(0)),
        Duration::from_millis(500),
        || assert_eq!(b.ask("release"), "released"),
    );
    assert!(
        !waited,
        "the UNMAP completed while the backend still held the page"
    );
    assert_eq!(status, Some(Status::Ok));
    // An UNMAP of a page no DMA holds completes at once, and the backend
    // sees both translations gone (through the new table).
    ok(&mut drv, unmap(1, iova(1)));
    let (t0, f0) = b.counts();
    assert_eq!(b.ask("run"), "running");
    let (_, f1) = wait_for_translations(&mut b, t0, 100);
    assert!(f1 > f0, "the unmapped pages still translate");
}

fn a_backend_of_the_previous_daemon_that_does_not_reconnect_holds_unmaps_until_it_exits() {
    let dir = scratch("restart-awaited");
    let mut d = start(&dir);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, iova(0), gpa(0)));
    ok(&mut drv, map(1, iova(1), gpa(1)));
    // A backend that never reconnects (the raw client of the other tests).
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    kill9(&mut d);
    let d = start(&dir);
    drv.reconnect(&d.vmm).unwrap();
    // MAPs are not held back.
    ok(&mut drv, map(1, iova(2), gpa(2)));
    let (waited, status) = request_racing(
        &mut drv,
        unmap(1, iova(0)),
        Duration::from_millis(500),
        || b.kill9(),
    );
    assert!(
        !waited,
        "the UNMAP completed while a backend of the previous daemon ran"
    );
    assert_eq!(status, Some(Status::Ok));
    d.wait_for_log(
        "exited before handing its table over",
        Duration::from_secs(5),
    );
    ok(&mut drv, unmap(1, iova(1)));

    // With --stall-kill-ms, such a backend is killed instead.
    let mut drv2 = drv;
    let mut d = d;
    let mut b = Backend::spawn(&d.backends, None);
    assert!(b.line().starts_with("connected"));
    kill9(&mut d);
    let state = dir.join("state");
    let d = Daemon::start_in(
        &dir,
        BIN.as_ref(),
        None,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--stall-kill-ms",
            "300",
        ],
    );
    drv2.reconnect(&d.vmm).unwrap();
    ok(&mut drv2, unmap(1, iova(2)));
    let status = b.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(
        d.log().contains("killed a backend of the previous daemon"),
        "{}",
        d.log()
    );
}

// ------------------------------------------------------------ systemd's store

/// A stand-in for systemd's notification socket and descriptor store: it
/// keeps what `FDSTORE=1` gives and drops what `FDSTOREREMOVE=1` names.
struct FakeSystemd {
    path: PathBuf,
    store: Arc<std::sync::Mutex<Vec<(String, std::os::fd::OwnedFd)>>>,
}

impl FakeSystemd {
    fn start(dir: &Path) -> FakeSystemd {
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let store = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = Arc::clone(&store);
        std::thread::spawn(move || {
            while let Ok((text, fds)) = vhost_user_iommu::fd_store::recv_notification(&sock) {
                let field = |k: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(k))
                        .map(str::to_owned)
                };
                let Some(name) = field("FDNAME=") else {
                    continue;
                };
                let mut store = kept.lock().unwrap();
                if field("FDSTORE=").as_deref() == Some("1") {
                    store.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
                } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
                    store.retain(|(n, _)| *n != name);
                }
            }
        });
        FakeSystemd { path, store }
    }

    fn names(&self) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Starts the daemon as systemd restarts a service: its stored
    /// descriptors from 3 on, named in LISTEN_FDNAMES.
    fn start_daemon(&self, dir: &Path) -> Daemon {
        let state = dir.join("state");
        let (vmm, backends, log) = (
            dir.join("vmm.sock"),
            dir.join("backends.sock"),
            dir.join("daemon.log"),
        );
        let store = self.store.lock().unwrap();
        let raw: Vec<i32> = store
            .iter()
            .map(|(_, fd)| std::os::fd::AsRawFd::as_raw_fd(fd))
            .collect();
        let names = store
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(":");
        // LISTEN_PID is the daemon's own PID: a shell that sets it to its
        // own and execs the daemon (the environment a Command sets cannot
        // be changed between fork and exec).
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(BIN)
            .arg("--socket-path")
            .arg(&vmm)
            .arg("--backend-socket")
            .arg(&backends)
            .args(["--state-dir", state.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", &self.path)
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", names)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the child only duplicates
        // descriptors (fcntl and dup2 are async-signal-safe).
        unsafe {
            cmd.pre_exec(move || {
                let mut high = Vec::with_capacity(raw.len());
                for &fd in &raw {
                    let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 200);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(h);
                }
                for (i, &h) in high.iter().enumerate() {
                    if libc::dup2(h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        drop(store);
        Daemon::ready(cmd.spawn().unwrap(), dir)
    }
}

/// The case the state directory's list cannot cover: a backend dies while
/// no daemon runs, with an io_uring read into a guest page that the kernel
/// completes later. The first daemon kept the backend's slot file, pidfd
/// and ring sentinel in systemd's descriptor store; the restarted daemon
/// gets them back and completes the guest's UNMAP of the page only once
/// the read has landed. Then the store is emptied of that backend.
fn a_backend_that_dies_while_no_daemon_runs_holds_the_unmap_through_systemds_store()
-> Result<(), String> {
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        return Err("needs root (FUSE)".into());
    }
    const IOVA: u64 = 0x40_0000;
    let dir = scratch("restart-fdstore");
    let disk = viommu_test_support::fuse::FuseDisk::mount(&dir.join("mnt"), 1 << 20)?;
    let systemd = FakeSystemd::start(&dir);
    let mut d = systemd.start_daemon(&dir);
    let mut drv = d.driver();
    let gpa = drv.ram().alloc(0x1000, 0x1000).unwrap();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, IOVA, gpa.0));
    let mut b =
        Backend::spawn_with_ram(&d.backends, None, Some(common::backends::ram_fd(&mut drv)));
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
    let pid = b.child.id();
    let prefix = format!("backend-{pid}-");
    let stored: Vec<String> = systemd
        .names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert_eq!(stored.len(), 3, "slots, pidfd, ring: {stored:?}");

    kill9(&mut d);
    b.kill9(); // while no daemon runs; its read is still in flight
    let d = systemd.start_daemon(&dir);
    drv.reconnect(&d.vmm).unwrap();
    let ram = drv.ram().mem().clone();
    let page = |ram: &viommu_frontend::memory::Mem| {
        let mut p = [0u8; 0x1000];
        vm_memory::Bytes::read_slice(ram, &mut p, gpa).unwrap();
        p
    };
    let (early, status) =
        request_racing(&mut drv, unmap(1, IOVA), Duration::from_millis(500), || {
            disk.answer(&read, b'F');
        });
    if early {
        disk.answer(&read, b'F');
    }
    assert!(
        !early,
        "the UNMAP completed while the dead backend's read was in flight"
    );
    assert_eq!(status, Some(Status::Ok));
    assert!(
        page(&ram).iter().all(|&x| x == b'F'),
        "the read landed before the UNMAP completed"
    );
    assert!(
        d.log().contains("from systemd's descriptor store"),
        "{}",
        d.log()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while systemd.names().iter().any(|n| n.starts_with(&prefix)) {
        assert!(
            Instant::now() < deadline,
            "the released backend is still in the store: {:?}",
            systemd.names()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(disk);
    Ok(())
}

fn main() {
    if let Ok(socket) = std::env::var(DMA_ROLE_ENV) {
        dma_backend_main(Path::new(&socket));
    }
    run_cases(
        "restart",
        &[
            (
                "a_daemon_killed_mid_batch_and_restarted_keeps_every_mapping_and_completes_the_batch",
                || {
                    a_daemon_killed_mid_batch_and_restarted_keeps_every_mapping_and_completes_the_batch();
                    Ok(())
                },
            ),
            ("a_restart_after_a_clean_stop_keeps_the_state_too", || {
                a_restart_after_a_clean_stop_keeps_the_state_too();
                Ok(())
            }),
            ("a_new_guest_after_the_restart_gets_a_fresh_device", || {
                a_new_guest_after_the_restart_gets_a_fresh_device();
                Ok(())
            }),
            (
                "a_corrupt_truncated_or_foreign_state_is_refused_and_the_daemon_exits",
                || {
                    a_corrupt_truncated_or_foreign_state_is_refused_and_the_daemon_exits();
                    Ok(())
                },
            ),
            (
                "a_state_saved_by_one_daemon_loads_in_another_and_a_tampered_one_is_refused",
                || {
                    a_state_saved_by_one_daemon_loads_in_another_and_a_tampered_one_is_refused();
                    Ok(())
                },
            ),
            (
                "a_backend_translates_through_a_restart_and_the_next_unmap_waits_for_its_pin",
                || {
                    a_backend_translates_through_a_restart_and_the_next_unmap_waits_for_its_pin();
                    Ok(())
                },
            ),
            (
                "a_backend_of_the_previous_daemon_that_does_not_reconnect_holds_unmaps_until_it_exits",
                || {
                    a_backend_of_the_previous_daemon_that_does_not_reconnect_holds_unmaps_until_it_exits();
                    Ok(())
                },
            ),
            (
                "a_backend_that_dies_while_no_daemon_runs_holds_the_unmap_through_systemds_store",
                a_backend_that_dies_while_no_daemon_runs_holds_the_unmap_through_systemds_store,
            ),
            (
                "requests_applied_but_not_completed_at_the_kill_complete_without_applying_again",
                || {
                    requests_applied_but_not_completed_at_the_kill_complete_without_applying_again(
                    );
                    Ok(())
                },
            ),
        ],
    );
}
