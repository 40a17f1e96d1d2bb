//! QEMU 11's recorded vhost-user sequences, replayed against the real
//! daemon (a separate process, a real socket, guest RAM in a memfd): a
//! pause (`stop`/`cont`) keeps every domain and mapping, a guest reboot —
//! which QEMU's generic device never announces with RESET_DEVICE — drops
//! them, and a backend that sees the rebooted guest set its queue up anew
//! makes the daemon drop them at once, before the backend's first DMA
//! (docs/design.md, "Device reset without RESET_DEVICE").
//!
//! The recording: tests/guest/recorded/qemu-11.1.3-reboot-pause.txt, made
//! by `tests/guest/run.sh --record`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::backends::{Daemon, EP, attach, map, ok};
use iotlb_shm::{Access, BackendClient, FaultKind};
use viommu_frontend::driver::Driver;
use viommu_frontend::driver::vmm_replay::{Section, Step, VmmReplay, parse_recording};
use virtio_iommu_proto::Status;

const RECORDING: &str = include_str!("../../../tests/guest/recorded/qemu-11.1.3-reboot-pause.txt");

const IOVA: u64 = 0x10_0000;
const GPA: u64 = 0x20_0000;

/// The steps of the first section whose marker starts with `title`.
fn section(title: &str) -> Vec<Step> {
    let sections: Vec<Section> = parse_recording(RECORDING).unwrap();
    sections
        .into_iter()
        .find(|s| s.title.starts_with(title))
        .unwrap_or_else(|| panic!("the recording has no section {title:?}"))
        .steps
}

/// Where the shared table sends `iova` of the endpoint now.
fn translate(client: &BackendClient, iova: u64) -> Result<u64, FaultKind> {
    let mut slot = client.slots.claim_slot().unwrap();
    let session = slot.enter(&client.table);
    session
        .translate_one(EP, iova, Access::READ)
        .map(|p| p.gpa)
        .map_err(|f| f.kind)
}

/// A daemon with the endpoint attached to domain 1 and IOVA mapped.
fn running(name: &str) -> (Daemon, Driver, BackendClient) {
    let d = Daemon::start(name, &[]);
    let mut drv = d.driver();
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, IOVA, GPA));
    let client = BackendClient::connect(&d.backends, 1, 1).unwrap();
    assert_eq!(translate(&client, IOVA), Ok(GPA));
    (d, drv, client)
}

fn resets_detected(d: &Daemon) -> usize {
    d.log()
        .matches("device reset detected without RESET_DEVICE")
        .count()
}

#[test]
fn qemu_pause_and_resume_keep_every_domain_and_mapping() {
    let (d, mut drv, client) = running("seq-pause");
    let mut replay = VmmReplay::default();
    replay.run(&mut drv, &section("host: stop")).unwrap();
    // Paused: backends still translate (they drain their I/O meanwhile).
    assert_eq!(translate(&client, IOVA), Ok(GPA));
    replay.run(&mut drv, &section("host: cont")).unwrap();
    assert_eq!(translate(&client, IOVA), Ok(GPA));
    // The request queue resumes where it stopped, with the same domain.
    ok(&mut drv, map(1, IOVA + 0x1000, GPA + 0x1000));
    let again = drv.send_one(&map(1, IOVA, GPA)).unwrap().status();
    assert_ne!(again, Some(Status::Ok), "the first mapping is still there");
    assert_eq!(resets_detected(&d), 0, "{}", d.log());
}

#[test]
fn qemu_guest_reboot_drops_every_domain_and_mapping_and_restores_bypass() {
    let (d, mut drv, client) = running("seq-reboot");
    drv.connection().set_bypass(false).unwrap();
    let mut replay = VmmReplay::default();
    replay.run(&mut drv, &section("guest: reboot")).unwrap();
    // Stopped, with no sign yet of what comes next: nothing is dropped.
    assert_eq!(translate(&client, IOVA), Ok(GPA));
    replay
        .run(&mut drv, &section("guest: firmware ran"))
        .unwrap();
    assert_eq!(resets_detected(&d), 1, "{}", d.log());
    assert!(
        d.log()
            .contains("read the config space while the queues were stopped"),
        "{}",
        d.log()
    );
    // Unattached again with bypass back on (its configured value): the
    // endpoint's IOVA is guest-physical, never the old page.
    assert_eq!(drv.connection().config().unwrap().bypass, 1);
    assert_eq!(translate(&client, IOVA), Ok(IOVA));
    // The new boot maps the same IOVA afresh (no INVAL, no EXIST).
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, IOVA, GPA + 0x5000));
    assert_eq!(translate(&client, IOVA), Ok(GPA + 0x5000));
}

#[test]
fn a_backend_seeing_its_queue_set_up_anew_while_the_iommu_is_stopped_resets_it_at_once() {
    let (d, mut drv, client) = running("seq-firmware");
    let mut replay = VmmReplay::default();
    replay.run(&mut drv, &section("guest: reboot")).unwrap();
    // The rebooted guest's firmware sets the disk's queue up: the backend
    // says so before its first DMA, and the old mapping is gone when the
    // daemon answers.
    client.driver_restarted(EP).unwrap();
    assert_eq!(translate(&client, IOVA), Ok(IOVA));
    assert_eq!(resets_detected(&d), 1, "{}", d.log());
    assert!(
        d.log().contains("while the IOMMU was stopped"),
        "{}",
        d.log()
    );
    // The kernel's probe that follows is the same reset, not a second one.
    replay
        .run(&mut drv, &section("guest: firmware ran"))
        .unwrap();
    assert_eq!(resets_detected(&d), 1, "{}", d.log());
    ok(&mut drv, attach(1));
    ok(&mut drv, map(1, IOVA, GPA));
    // A driver rebind of the endpoint while the IOMMU runs changes nothing.
    client.driver_restarted(EP).unwrap();
    assert_eq!(translate(&client, IOVA), Ok(GPA));
    assert_eq!(resets_detected(&d), 1, "{}", d.log());
}

#[test]
fn a_queue_set_up_anew_during_a_pause_of_a_running_iommu_is_not_a_reset() {
    // Before the IOMMU ever stopped, DRIVER_RESTARTED (a backend whose own
    // VMM connection restarted) keeps everything.
    let (d, _drv, client) = running("seq-no-reset");
    client.driver_restarted(EP).unwrap();
    assert_eq!(translate(&client, IOVA), Ok(GPA));
    assert_eq!(resets_detected(&d), 0, "{}", d.log());
}

#[test]
fn a_lookup_by_hand_shows_the_live_translation_and_the_fault() {
    // What `iotlb-reader lookup SOCKET EP IOVA LEN` prints comes from here.
    let (_d, _drv, client) = running("seq-lookup");
    let pieces = client.lookup(EP, IOVA, 0x1000).unwrap();
    assert_eq!(pieces.len(), 1);
    let (at, piece) = pieces[0].unwrap();
    assert_eq!((at, piece.gpa, piece.len), (IOVA, GPA, 0x1000));
    let pieces = client.lookup(EP, IOVA + 0x1000, 0x1000).unwrap();
    assert!(
        matches!(pieces[..], [Err(f)] if f.kind == FaultKind::Mapping),
        "{pieces:?}"
    );
}

#[test]
fn a_kick_before_the_queue_is_enabled_again_is_served_without_the_watchdog() {
    // After `cont` QEMU does not wait for SET_VRING_ENABLE to be processed
    // before the guest runs on: its first kick can reach the daemon (on the
    // same kick eventfd as before the stop) while the queue is disabled.
    // The request must complete, and nothing may be left to the watchdog.
    let (d, mut drv, client) = running("seq-early-kick");
    let mut replay = VmmReplay::default();
    replay.run(&mut drv, &section("host: stop")).unwrap();
    let cont = section("host: cont");
    let first_enable = cont
        .iter()
        .position(|s| matches!(s, Step::Enable { on: true, .. }))
        .unwrap();
    replay.run(&mut drv, &cont[..first_enable]).unwrap();
    drv.post(&map(1, IOVA + 0x2000, GPA + 0x2000)).unwrap();
    // Let the daemon take the kick before it hears of the enable.
    std::thread::sleep(std::time::Duration::from_millis(50));
    replay.run(&mut drv, &cont[first_enable..]).unwrap();
    assert_eq!(drv.wait_posted().unwrap().status(), Some(Status::Ok));
    assert_eq!(translate(&client, IOVA + 0x2000), Ok(GPA + 0x2000));
    assert!(
        !d.log().contains("served by the watchdog"),
        "the early kick was lost until the watchdog:\n{}",
        d.log()
    );
}
