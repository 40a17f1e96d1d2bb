//! Data integrity through the real `vhost-user-blk` process: random reads
//! and writes on 4 queues at queue depth 64, every read checked against
//! the pattern last written to its block, with each guest DMA policy —
//! `off` (no IOMMU at all), and behind the real `vhost-user-iommu` daemon
//! (the backend translating through its shared table): `passthrough`,
//! `strict`, `lazy` and `static`; plus `strict` with the backend's
//! `O_DIRECT` path, `static` with the backend polling (`--poll-us`), and
//! the message-mode backend under `passthrough`, `strict`, `lazy` and
//! `static`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Blk, Iommu, Scratch};
use viommu_frontend::blk::BlkOptions;
use viommu_frontend::blk_load::{BlkVm, LoadOptions, LoadReport, VmOptions};
use viommu_frontend::guest_dma::Policy;

/// Guest RAM (IOVAs are allocated in its upper half).
const RAM: u64 = 64 << 20;
/// Bytes per request.
const BLOCK: u32 = 4096;
/// Blocks of the disk the workload uses.
const SPAN_BLOCKS: u64 = 512;
/// Requests per run.
const COUNT: u64 = 20_000;
/// The device's endpoint behind the IOMMU.
const ENDPOINT: u32 = 8;

/// The image: twice the span, so the span is well inside the disk.
fn image(dir: &Scratch) -> String {
    let img = dir.image("disk.img", 2 * SPAN_BLOCKS * u64::from(BLOCK));
    img.to_str().unwrap().to_owned()
}

fn load() -> LoadOptions {
    LoadOptions {
        depth: 64,
        read_percent: 50,
        block: BLOCK,
        count: Some(COUNT),
        duration: None,
        span_blocks: Some(SPAN_BLOCKS),
        seed: 0x5eed_1234,
        verify: true,
        ..LoadOptions::default()
    }
}

fn vm_options(blk: &Blk, iommu: Option<&Iommu>, policy: Policy) -> VmOptions {
    VmOptions {
        blk_socket: blk.socket.clone(),
        iommu_socket: iommu.map(|i| i.vmm.clone()),
        policy,
        endpoint: ENDPOINT,
        domain: 1,
        ram_size: RAM,
        blk: BlkOptions {
            queues: 4,
            queue_size: 256,
            event_idx: true,
            iommu_platform: false,
        },
    }
}

/// Runs the workload and checks what every run must show.
fn run_checked(blk: &mut Blk, iommu: Option<&Iommu>, policy: Policy) -> LoadReport {
    let mut vm = BlkVm::start(&vm_options(blk, iommu, policy))
        .unwrap_or_else(|e| panic!("{policy}: bring-up failed: {e}\n{}", blk.proc.log_text()));
    assert_eq!(vm.dev.queue_count(), 4, "{policy}: every queue set up");
    let r = vm
        .run(&load())
        .unwrap_or_else(|e| panic!("{policy}: the run failed: {e}\n{}", blk.proc.log_text()));
    eprintln!(
        "{policy}: {} reads, {} writes, {:?} maps/unmaps/batches in {:?}",
        r.reads, r.writes, r.dma, r.elapsed
    );
    assert_eq!(r.ios, COUNT, "{policy}: every request completed");
    assert_eq!(r.errors, 0, "{policy}: requests that failed");
    assert_eq!(r.mismatches, 0, "{policy}: reads that returned wrong data");
    assert!(r.reads > 0 && r.writes > 0, "{policy}: {r:?}");
    assert!(
        blk.proc.child.try_wait().unwrap().is_none(),
        "{policy}: the backend died:\n{}",
        blk.proc.log_text()
    );
    if let Some(i) = iommu {
        assert!(
            i.proc.log_text().lines().all(|l| !l.contains("panicked")),
            "{policy}: the daemon panicked:\n{}",
            i.proc.log_text()
        );
    }
    r
}

/// The backend of the daemon `iommu`, with `extra` arguments.
fn backend_of(dir: &Scratch, iommu: &Iommu, extra: &[&str]) -> Blk {
    backend_in_mode(dir, &iommu.mode(), extra)
}

/// A backend with `--iommu mode`.
fn backend_in_mode(dir: &Scratch, mode: &str, extra: &[&str]) -> Blk {
    let img = image(dir);
    let endpoint = ENDPOINT.to_string();
    let mut args = vec![
        "--blk-file",
        &img,
        "--num-queues",
        "4",
        "--iommu",
        mode,
        "--endpoint",
        &endpoint,
    ];
    args.extend_from_slice(extra);
    Blk::start(dir, &args)
}

/// Maps and unmaps went to the IOMMU, one UNMAP for every MAP.
fn assert_mapped(r: &LoadReport, policy: Policy) {
    assert!(r.dma.maps > 0, "{policy}: no MAP was sent: {:?}", r.dma);
    assert_eq!(r.dma.maps, r.dma.unmaps, "{policy}: every MAP is unmapped");
}

#[test]
fn off_policy_without_an_iommu_keeps_every_block_intact() {
    let dir = Scratch::new("int-off");
    let img = image(&dir);
    let mut blk = Blk::start(&dir, &["--blk-file", &img, "--num-queues", "4"]);
    let r = run_checked(&mut blk, None, Policy::Off);
    assert_eq!((r.dma.maps, r.dma.unmaps), (0, 0));
}

#[test]
fn passthrough_policy_through_the_daemon_keeps_every_block_intact() {
    let dir = Scratch::new("int-pt");
    let iommu = Iommu::start(&dir, &[]);
    let mut blk = backend_of(&dir, &iommu, &[]);
    let r = run_checked(&mut blk, Some(&iommu), Policy::Passthrough);
    assert_eq!((r.dma.maps, r.dma.unmaps), (0, 0));
}

#[test]
fn strict_policy_through_the_daemon_keeps_every_block_intact() {
    let dir = Scratch::new("int-strict");
    let iommu = Iommu::start(&dir, &[]);
    let mut blk = backend_of(&dir, &iommu, &[]);
    let r = run_checked(&mut blk, Some(&iommu), Policy::Strict);
    assert_mapped(&r, Policy::Strict);
}

#[test]
fn lazy_policy_through_the_daemon_keeps_every_block_intact() {
    let dir = Scratch::new("int-lazy");
    let iommu = Iommu::start(&dir, &[]);
    let mut blk = backend_of(&dir, &iommu, &[]);
    let r = run_checked(&mut blk, Some(&iommu), Policy::Lazy);
    assert_mapped(&r, Policy::Lazy);
}

#[test]
fn strict_policy_with_o_direct_keeps_every_block_intact() {
    let dir = Scratch::new("int-direct");
    let iommu = Iommu::start(&dir, &[]);
    let mut blk = backend_of(&dir, &iommu, &["--direct"]);
    let r = run_checked(&mut blk, Some(&iommu), Policy::Strict);
    assert_mapped(&r, Policy::Strict);
}

#[test]
fn static_policy_through_the_daemon_keeps_every_block_intact() {
    let dir = Scratch::new("int-static");
    let iommu = Iommu::start(&dir, &[]);
    // The backend polls its rings between requests (--poll-us).
    let mut blk = backend_of(&dir, &iommu, &["--poll-us", "50"]);
    let r = run_checked(&mut blk, Some(&iommu), Policy::Static);
    assert_eq!(
        (r.dma.maps, r.dma.unmaps),
        (0, 0),
        "guest RAM was mapped once, before the run"
    );
}

#[test]
fn message_mode_keeps_every_block_intact_under_every_mapping_policy() {
    for policy in [
        Policy::Passthrough,
        Policy::Strict,
        Policy::Lazy,
        Policy::Static,
    ] {
        let dir = Scratch::new(&format!("int-msg-{policy}"));
        let iommu = Iommu::start(&dir, &[]);
        let mut blk = backend_in_mode(&dir, &iommu.msg_mode(), &[]);
        let r = run_checked(&mut blk, Some(&iommu), policy);
        if matches!(policy, Policy::Strict | Policy::Lazy) {
            assert_mapped(&r, policy);
        }
    }
}
