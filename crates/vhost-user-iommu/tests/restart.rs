//! A daemon restarted on its `--state-dir` carries on with the guest's
//! device state: the real daemon is killed with SIGKILL while requests are
//! in flight, started again on the same directory, and the VMM stand-in
//! reconnects as QEMU does (same guest memory and rings, each ring resumed
//! at its used index).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::backends::{Backend, Daemon, EP, attach, map, ok, run_cases, scratch, unmap};
use iotlb_shm::BackendClient;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
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
    let specs: Vec<_> = (SETTLED..SETTLED + IN_FLIGHT)
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
    drop(client);
    kill9(&mut d);
    holder.kill9();

    let d = start(&dir);
    drv.reconnect(&d.vmm).unwrap();
    let mut done = collect_all(&mut drv);
    done.sort_by_key(|(i, _)| *i);
    assert_eq!(
        done,
        vec![(0, Some(Status::Ok)), (1, Some(Status::Ok))],
        "{}",
        d.log()
    );
    let client = BackendClient::connect(&d.backends, 1, 0).unwrap();
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

fn main() {
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
