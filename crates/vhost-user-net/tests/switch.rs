//! The switch as hosting providers run it: a real `vhost-user-net` process,
//! real `vhost-user-iommu` daemons (one per guest), and guests (the
//! `viommu-frontend` stand-in: VMM and Linux driver) exchanging frames over
//! real vhost-user sockets, guest RAM in memfds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use viommu_frontend::blk_queue::{Buf, RawDesc};
use viommu_frontend::guest_dma::Policy;
use viommu_frontend::net::{
    CTRL_QUEUE, NET_HDR_LEN, NetOptions, RX_QUEUE, TX_QUEUE, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_RX, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use viommu_frontend::net_frame::{BROADCAST, build_frame};
use viommu_frontend::net_load::{self, Flow, NetReport, NetVm, NetVmOptions, TrafficOptions};
use viommu_test_support::processes::{Iommu, Proc, sibling_binary};
use virtio_iommu_proto::FaultReason;
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 256 << 20;
const EP: u32 = 8;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

fn scratch(name: &str) -> PathBuf {
    viommu_test_support::scratch::dir("vunet", name)
}

/// The switch with one port per entry of `ports` (`iommu=...,endpoint=...`
/// or empty, and an optional `mac=`), sockets in `dir`.
fn switch(dir: &Path, ports: &[String], extra: &[&str]) -> (Proc, Vec<PathBuf>) {
    let sockets: Vec<PathBuf> = (0..ports.len())
        .map(|i| dir.join(format!("port{i}.sock")))
        .collect();
    let mut args: Vec<String> = Vec::new();
    for (s, p) in sockets.iter().zip(ports) {
        args.push("--port".into());
        let mut v = format!("socket={}", s.display());
        if !p.is_empty() {
            v.push(',');
            v.push_str(p);
        }
        args.push(v);
    }
    if !extra.contains(&"--idle-us") {
        // Tests share two cores: polling threads back off when idle.
        args.extend(["--idle-us", "50"].map(String::from));
    }
    args.extend(["--log-level", "info"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let wait: Vec<&Path> = sockets.iter().map(PathBuf::as_path).collect();
    let proc = Proc::spawn(
        Path::new(env!("CARGO_BIN_EXE_vhost-user-net")),
        &argv,
        dir.join("switch.log"),
        &wait,
    );
    (proc, sockets)
}

fn queues_started(sw: &Proc, socket: &Path) -> usize {
    let needle = format!("port={}", socket.display());
    sw.log_text()
        .lines()
        .filter(|l| l.contains("queue started") && l.contains(&needle))
        .count()
}

/// A guest on the switch's port at `socket`, once the switch serves its
/// three queues (frames sent before would find no receive queue, as a real
/// guest's first frames may).
fn vm(
    sw: &Proc,
    socket: &Path,
    iommu: Option<&Iommu>,
    policy: Policy,
    mac: Option<[u8; 6]>,
) -> NetVm {
    let before = queues_started(sw, socket);
    let vm = NetVm::start(&NetVmOptions {
        net_socket: socket.to_path_buf(),
        iommu_socket: iommu.map(|i| i.vmm.clone()),
        policy,
        endpoint: EP,
        domain: 1,
        ram_size: RAM,
        mac,
        net: NetOptions::default(),
        boot_commands: true,
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while queues_started(sw, socket) < before + 3 {
        assert!(
            Instant::now() < deadline,
            "queues not started:\n{}",
            sw.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    vm
}

fn flow(from: usize, source: u32, to: [u8; 6], len: usize, count: u64) -> Flow {
    Flow {
        from,
        source,
        to_mac: to,
        frame_len: len,
        rate: 0,
        count: Some(count),
    }
}

fn traffic(vms: &mut [NetVm], flows: &[Flow]) -> Vec<NetReport> {
    let opts = TrafficOptions {
        drain: Duration::from_secs(3),
        ..TrafficOptions::default()
    };
    net_load::run(vms, flows, &opts).unwrap()
}

fn intact(r: &NetReport) {
    assert_eq!(
        (
            r.rx_corrupt,
            r.rx_bad_header,
            r.rx_bad_num_buffers,
            r.rx_bad_used_len
        ),
        (0, 0, 0, 0),
        "{r:?}"
    );
}

fn from(r: &NetReport, source: u32) -> u64 {
    r.rx_by_source.get(&source).copied().unwrap_or(0)
}

/// The switch's counters of port `port` at its last disconnect.
fn last_counters(switch: &Proc, port: &Path) -> Option<String> {
    let needle = format!("port={}", port.display());
    switch
        .log_text()
        .lines()
        .rev()
        .find(|l| l.contains("VMM connection over") && l.contains(&needle))
        .map(str::to_string)
}

/// Waits until port `port`'s counters at a disconnect contain `want`.
fn wait_for_counters(switch: &Proc, port: &Path, want: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = last_counters(switch, port) {
            if want.iter().all(|w| line.contains(w)) {
                return line;
            }
        }
        assert!(
            Instant::now() < deadline,
            "counters {want:?} never logged:\n{}",
            switch.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the first fault record on `vm`'s event queue: a mapping
/// fault of the device's endpoint at `address`.
fn expect_fault(vm: &mut NetVm, address: u64) {
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
    assert_eq!(
        (rec.endpoint, rec.address, rec.reason),
        (EP, Some(address), FaultReason::Mapping)
    );
}

#[test]
fn two_guests_exchange_intact_frames_in_every_translation_mode() {
    for (mode, policy) in [
        ("none", Policy::Off),
        ("table", Policy::Strict),
        ("table", Policy::Lazy),
        ("iotlb-msg", Policy::Strict),
        ("iotlb-msg", Policy::Lazy),
    ] {
        let dir = scratch(&format!("modes-{mode}-{policy}"));
        let iommus: Vec<Iommu> = if mode == "none" {
            Vec::new()
        } else {
            (0..2)
                .map(|i| Iommu::start_named(&dir, &format!("iommu{i}"), &[]))
                .collect()
        };
        let ports: Vec<String> = (0..2)
            .map(|i| match mode {
                "none" => String::new(),
                "table" => format!("iommu={},endpoint={EP}", iommus[i].mode()),
                _ => format!("iommu={},endpoint={EP}", iommus[i].msg_mode()),
            })
            .collect();
        let (sw, sockets) = switch(&dir, &ports, &[]);
        let mut vms: Vec<NetVm> = (0..2)
            .map(|i| vm(&sw, &sockets[i], iommus.get(i), policy, None))
            .collect();
        assert_eq!(vms[0].boot_acks(), vms[1].boot_acks());
        assert!(
            !vms[0].boot_acks().is_empty()
                && vms[0].boot_acks().iter().all(|&a| a == VIRTIO_NET_OK),
            "{:?}",
            vms[0].boot_acks()
        );
        let (a, b) = (vms[0].mac(), vms[1].mac());
        let reports = traffic(
            &mut vms,
            &[
                flow(0, 10, b, 64, 150),
                flow(0, 11, BROADCAST, 200, 50),
                flow(1, 20, a, 1500, 150),
            ],
        );
        let what = format!("{mode}/{policy}");
        for r in &reports {
            intact(r);
            assert_eq!(r.rx_foreign, 0, "{what}: {r:?}");
        }
        assert_eq!(from(&reports[1], 10), 150, "{what}: {:?}", reports[1]);
        assert_eq!(from(&reports[1], 11), 50, "{what}: broadcast reaches B");
        assert_eq!(from(&reports[0], 20), 150, "{what}: {:?}", reports[0]);
        assert_eq!(
            from(&reports[0], 11),
            0,
            "{what}: broadcast not back to its source"
        );
        assert_eq!(reports[0].tx_completed, 200, "{what}");
        if policy != Policy::Off {
            assert!(
                reports[0].dma.maps >= 200,
                "{what}: every buffer mapped: {:?}",
                reports[0].dma
            );
        }
        drop(vms);
        let line = wait_for_counters(&sw, &sockets[1], &["rx_frames=200"]);
        assert!(
            line.contains("tx_frames=150") && line.contains("rx_no_buffers=0"),
            "{what}: {line}"
        );
    }
}

#[test]
fn the_switch_learns_addresses_and_floods_broadcast_and_unknown_unicast() {
    let dir = scratch("learn");
    let (sw, sockets) = switch(&dir, &["".into(), "".into(), "".into()], &[]);
    // Addresses other than the ports' configured ones: learned, not fixed.
    let macs = [
        [2, 0xaa, 0, 0, 0, 1],
        [2, 0xaa, 0, 0, 0, 2],
        [2, 0xaa, 0, 0, 0, 3],
    ];
    let mut vms: Vec<NetVm> = (0..3)
        .map(|i| vm(&sw, &sockets[i], None, Policy::Off, Some(macs[i])))
        .collect();
    // A to B, unknown yet: flooded to B and C.
    let r = traffic(&mut vms, &[flow(0, 1, macs[1], 64, 1)]);
    assert_eq!(from(&r[1], 1), 1, "{r:?}\n{}", sw.log_text());
    assert_eq!(
        (r[2].rx_foreign, r[2].rx_frames),
        (1, 1),
        "C got the flood: {:?}",
        r[2]
    );
    // B to A: A was learned from its frame, so only A gets it.
    let r = traffic(&mut vms, &[flow(1, 2, macs[0], 64, 1)]);
    assert_eq!(from(&r[0], 2), 1);
    assert_eq!(
        r[2].rx_frames, 0,
        "C sees nothing once A is learned: {:?}",
        r[2]
    );
    // A to B again: B was learned too.
    let r = traffic(&mut vms, &[flow(0, 3, macs[1], 64, 100)]);
    assert_eq!(from(&r[1], 3), 100);
    assert_eq!(r[2].rx_frames, 0, "{:?}", r[2]);
    assert_eq!(r[0].rx_frames, 0, "nothing goes back to its source");
    // C broadcasts: A and B get every frame.
    let r = traffic(&mut vms, &[flow(2, 4, BROADCAST, 300, 40)]);
    assert_eq!(
        (from(&r[0], 4), from(&r[1], 4), r[2].rx_frames),
        (40, 40, 0)
    );
    for x in &r {
        intact(x);
    }
}

/// A frame at an unmapped IOVA is dropped and a fault record reaches that
/// guest's event queue; both ports go on forwarding.
#[test]
fn a_transmit_buffer_at_an_unmapped_iova_faults_into_that_guests_event_queue() {
    let dir = scratch("txfault");
    let iommus: Vec<Iommu> = (0..2)
        .map(|i| Iommu::start_named(&dir, &format!("iommu{i}"), &[]))
        .collect();
    let ports: Vec<String> = iommus
        .iter()
        .map(|i| format!("iommu={},endpoint={EP}", i.mode()))
        .collect();
    let (sw, sockets) = switch(&dir, &ports, &[]);
    let mut vms: Vec<NetVm> = (0..2)
        .map(|i| vm(&sw, &sockets[i], Some(&iommus[i]), Policy::Strict, None))
        .collect();
    vms[0]
        .guest
        .iommu()
        .unwrap()
        .post_event_buffers(4, 24)
        .unwrap();
    let bad = RAM + 0x10_0000;
    vms[0]
        .post_raw_tx(&[RawDesc {
            addr: bad,
            len: (NET_HDR_LEN + 64) as u32,
            flags: 0,
            next: None,
        }])
        .unwrap();
    expect_fault(&mut vms[0], bad);
    let (a, b) = (vms[0].mac(), vms[1].mac());
    let r = traffic(&mut vms, &[flow(0, 1, b, 64, 100), flow(1, 2, a, 64, 100)]);
    assert_eq!((from(&r[1], 1), from(&r[0], 2)), (100, 100), "{r:?}");
    assert_eq!(r[1].rx_frames, 100, "the faulting frame was not forwarded");
    intact(&r[0]);
    intact(&r[1]);
    drop(vms);
    let line = wait_for_counters(&sw, &sockets[0], &["tx_faults=1"]);
    assert!(line.contains("tx_frames=100"), "{line}");
}

/// The guest unmaps a posted receive buffer: the UNMAP completes, and the
/// switch can no longer write into it — the frame is dropped, the buffer
/// comes back untouched with used length 0, and the fault is reported.
#[test]
fn an_unmapped_receive_buffer_is_never_written() {
    let dir = scratch("rxunmap");
    let iommus: Vec<Iommu> = (0..2)
        .map(|i| Iommu::start_named(&dir, &format!("iommu{i}"), &[]))
        .collect();
    let ports: Vec<String> = iommus
        .iter()
        .map(|i| format!("iommu={},endpoint={EP}", i.mode()))
        .collect();
    let (sw, sockets) = switch(&dir, &ports, &[]);
    let mut a = vm(&sw, &sockets[0], Some(&iommus[0]), Policy::Strict, None);
    let mut b = vm(&sw, &sockets[1], Some(&iommus[1]), Policy::Strict, None);
    b.guest.iommu().unwrap().post_event_buffers(4, 24).unwrap();
    let gpa = b.guest.ram().alloc(4096, 4096).unwrap().0;
    let mem = b.dev.mem().clone();
    mem.write_slice(&[0xaa; 4096], GuestAddress(gpa)).unwrap();
    let iova = b.dma.map(b.guest.iommu(), gpa, 2048, true).unwrap();
    b.dev
        .post_rx(
            Buf {
                dev: iova,
                gpa,
                len: 2048,
            },
            7,
        )
        .unwrap();
    b.dev.publish(RX_QUEUE).unwrap();
    // Strict: the UNMAP is sent and waited for; it completes at once (no
    // frame is being written there).
    b.dma.unmap(b.guest.iommu(), iova, 2048).unwrap();
    let frame = build_frame(b.mac(), a.mac(), 1, 0, 64);
    a.send_frame(&frame, false, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let done = loop {
        if let Some(c) = b.dev.rx_queue().pop(&mem).unwrap() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the receive buffer never came back"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!((done.tag, done.used_len), (7, 0));
    let mut back = [0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(gpa)).unwrap();
    assert!(
        back.iter().all(|&x| x == 0xaa),
        "the unmapped buffer was written"
    );
    expect_fault(&mut b, iova);
    drop((a, b));
    wait_for_counters(&sw, &sockets[1], &["rx_faults=1", "rx_frames=0"]);
}

/// Hostile transmit chains are dropped and counted, never forwarded, and
/// the port goes on; a header split over descriptors is legal (VERSION_1
/// implies ANY_LAYOUT) and is forwarded.
#[test]
fn hostile_transmit_chains_are_dropped_and_counted() {
    let dir = scratch("hostile-tx");
    let (sw, sockets) = switch(&dir, &["".into(), "".into()], &[]);
    let a = vm(&sw, &sockets[0], None, Policy::Off, None);
    let b = vm(&sw, &sockets[1], None, Policy::Off, None);
    let mut vms = vec![a, b];
    let bmac = vms[1].mac();
    // A first run posts B's receive buffers.
    let r = traffic(&mut vms, &[flow(0, 1, bmac, 64, 1)]);
    assert_eq!(from(&r[1], 1), 1);
    let a = &mut vms[0];
    let frame = build_frame(bmac, a.mac(), 9, 0, 64);
    let mem = a.dev.mem().clone();
    let page = a.guest.ram().alloc(8192, 4096).unwrap().0;
    let put = |at: u64, hdr: [u8; NET_HDR_LEN]| {
        mem.write_slice(&hdr, GuestAddress(at)).unwrap();
        mem.write_slice(&frame, GuestAddress(at + NET_HDR_LEN as u64))
            .unwrap();
    };
    put(page, [0; NET_HDR_LEN]);
    let mut csum = [0u8; NET_HDR_LEN];
    csum[0] = 1; // NEEDS_CSUM, not negotiated
    put(page + 1024, csum);
    let mut gso = [0u8; NET_HDR_LEN];
    gso[1] = 1; // GSO_TCPV4, not negotiated
    put(page + 2048, gso);
    let d = |addr: u64, len: usize, flags: u16, next: Option<usize>| RawDesc {
        addr,
        len: len as u32,
        flags,
        next,
    };
    let whole = NET_HDR_LEN + frame.len();
    let chains: Vec<Vec<RawDesc>> = vec![
        vec![d(page, 0, 0, None)],                  // runt: empty
        vec![d(page, NET_HDR_LEN, 0, None)],        // runt: header only
        vec![d(page, NET_HDR_LEN + 8, 0, None)],    // runt
        vec![d(page, NET_HDR_LEN + 1519, 0, None)], // oversize
        vec![d(page + 1024, whole, 0, None)],       // bad header
        vec![d(page + 2048, whole, 0, None)],       // bad header
        vec![
            d(page, NET_HDR_LEN, 0, Some(1)),
            d(page + 12, frame.len(), VRING_DESC_F_WRITE, None),
        ], // writable
        vec![d(page, NET_HDR_LEN, 0, Some(0))],     // loop
        vec![d(page, 15, VRING_DESC_F_INDIRECT, None)], // bad indirect
        vec![d(RAM + (1 << 30), whole, 0, None)],   // outside RAM
        // Legal: the header over three descriptors, then the frame.
        vec![
            d(page, 5, 0, Some(1)),
            d(page + 5, 4, 0, Some(2)),
            d(page + 9, 3, 0, Some(3)),
            d(page + 12, frame.len(), 0, None),
        ],
    ];
    for c in &chains {
        a.post_raw_tx(c).unwrap();
    }
    // Every chain comes back with used length 0.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut back = 0;
    while back < chains.len() {
        match a.dev.tx_queue().pop(&mem).unwrap() {
            Some(c) => {
                assert_eq!(c.used_len, 0);
                back += 1;
            }
            None => {
                assert!(
                    Instant::now() < deadline,
                    "{back} of {} chains came back",
                    chains.len()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let r = traffic(&mut vms, &[flow(0, 1, bmac, 64, 10)]);
    intact(&r[1]);
    assert_eq!(
        from(&r[1], 9),
        1,
        "the split header frame arrived: {:?}",
        r[1]
    );
    assert_eq!(
        (from(&r[1], 1), r[1].rx_frames),
        (10, 11),
        "nothing else arrived: {:?}",
        r[1]
    );
    drop(vms);
    let line = wait_for_counters(&sw, &sockets[0], &["tx_frames=12"]);
    for want in [
        "tx_malformed=3",
        "tx_runt=3",
        "tx_oversize=1",
        "tx_bad_header=2",
        "tx_faults=1",
    ] {
        assert!(line.contains(want), "{want}: {line}");
    }
}

/// Control commands: what Linux sends at boot is acknowledged; unknown or
/// malformed commands answer ERR or come back unused, and the queue goes on.
#[test]
fn control_queue_commands_are_acknowledged_refused_or_returned_unused() {
    let dir = scratch("ctrl");
    let (sw, sockets) = switch(&dir, &["".into()], &[]);
    let mut g = vm(&sw, &sockets[0], None, Policy::Off, None);
    assert!(
        g.boot_acks().iter().all(|&a| a == VIRTIO_NET_OK),
        "{:?}",
        g.boot_acks()
    );
    let boot = g.boot_acks().len();
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_RX, 0, &[1]).unwrap(), VIRTIO_NET_OK);
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_RX, 0, &[2]).unwrap(), VIRTIO_NET_ERR);
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_RX, 0, &[]).unwrap(), VIRTIO_NET_ERR);
    assert_eq!(
        g.ctrl(VIRTIO_NET_CTRL_RX, 4, &[1]).unwrap(),
        VIRTIO_NET_ERR,
        "NOUNI needs CTRL_RX_EXTRA"
    );
    assert_eq!(
        g.ctrl(VIRTIO_NET_CTRL_MAC, 0, &[1, 0, 0, 0]).unwrap(),
        VIRTIO_NET_ERR,
        "table cut short"
    );
    assert_eq!(g.ctrl(9, 0, &[0]).unwrap(), VIRTIO_NET_ERR, "unknown class");
    // Raw chains: no ack buffer; the ack buffer first; a loop.
    let mem = g.dev.mem().clone();
    let page = g.guest.ram().alloc(4096, 4096).unwrap().0;
    mem.write_slice(&[0, 0, 1], GuestAddress(page)).unwrap();
    let raw = |addr: u64, len: u32, flags: u16, next: Option<usize>| RawDesc {
        addr,
        len,
        flags,
        next,
    };
    let chains = [
        vec![raw(page, 3, 0, None)],
        vec![
            raw(page + 64, 1, VRING_DESC_F_WRITE, Some(1)),
            raw(page, 3, 0, None),
        ],
        vec![raw(page, 3, 0, Some(0))],
        vec![
            raw(page, 3, 0, Some(1)),
            raw(page + 64, 0, VRING_DESC_F_WRITE, None),
        ],
    ];
    for c in &chains {
        let q = g.dev.ctrl_queue().unwrap();
        q.post_raw(&mem, c, 1000).unwrap();
        g.dev.publish(CTRL_QUEUE).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut back = 0;
    while back < chains.len() {
        match g.dev.ctrl_queue().unwrap().pop(&mem).unwrap() {
            Some(c) => {
                assert_eq!((c.tag, c.used_len), (1000, 0), "returned unused");
                back += 1;
            }
            None => {
                assert!(Instant::now() < deadline, "{back} chains came back");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    assert_eq!(
        g.ctrl(VIRTIO_NET_CTRL_RX, 1, &[0]).unwrap(),
        VIRTIO_NET_OK,
        "the queue goes on"
    );
    drop(g);
    let ok = format!("ctrl_ok={}", boot + 2);
    wait_for_counters(&sw, &sockets[0], &[&ok, "ctrl_err=9"]);
    let _ = TX_QUEUE;
}

/// A guest process killed mid-traffic stops only its own port: the others
/// lose nothing, and the port takes the next VMM.
#[test]
fn a_guest_killed_mid_traffic_does_not_disturb_the_other_ports() {
    let dir = scratch("disconnect");
    let (sw, sockets) = switch(&dir, &["".into(), "".into(), "".into()], &[]);
    let mut vms: Vec<NetVm> = (0..2)
        .map(|i| vm(&sw, &sockets[i], None, Policy::Off, None))
        .collect();
    let (a, b) = (vms[0].mac(), vms[1].mac());
    let a_text = format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        a[0], a[1], a[2], a[3], a[4], a[5]
    );
    let third = format!("socket={},to={a_text}", sockets[2].display());
    let mut c = Proc::spawn(
        &sibling_binary("viommu-frontend", "viommu-frontend"),
        &[
            "net",
            "--port",
            &third,
            "--rate",
            "1000",
            "--duration",
            "30",
        ],
        dir.join("guest-c.log"),
        &[],
    );
    sw.wait_for_log(
        &format!("VMM connected port={}", sockets[2].display()),
        Duration::from_secs(10),
    );
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c.kill9();
        c
    });
    let mut f0 = flow(0, 100, b, 64, 2000);
    f0.rate = 4000;
    let mut f1 = flow(1, 101, a, 64, 2000);
    f1.rate = 4000;
    let r = traffic(&mut vms, &[f0, f1]);
    let _c = killer.join().unwrap();
    intact(&r[0]);
    intact(&r[1]);
    assert_eq!((from(&r[1], 100), from(&r[0], 101)), (2000, 2000), "{r:?}");
    sw.wait_for_log("VMM disconnected", Duration::from_secs(10));
    // The port takes the next guest.
    let mut next = vm(&sw, &sockets[2], None, Policy::Off, None);
    let cmac = next.mac();
    vms.push(next);
    let r = traffic(&mut vms, &[flow(2, 7, a, 64, 50), flow(0, 8, cmac, 64, 50)]);
    assert_eq!((from(&r[0], 7), from(&r[2], 8)), (50, 50), "{r:?}");
    assert!(
        last_counters(&sw, &sockets[2]).is_some(),
        "the killed guest's counters"
    );
    next = vms.pop().unwrap();
    drop(next);
}

/// A frame larger than one receive buffer spans several with MRG_RXBUF
/// (`num_buffers` says how many); without it, a frame needs one buffer big
/// enough, and is dropped (counted) rather than cut.
#[test]
fn frames_span_merged_receive_buffers_and_without_them_need_one_big_enough() {
    for mrg in [true, false] {
        let dir = scratch(&format!("mrg-{mrg}"));
        let (sw, sockets) = switch(&dir, &["".into(), "".into()], &[]);
        let start = |s: &Path| {
            let before = queues_started(&sw, s);
            let vm = NetVm::start(&NetVmOptions {
                net_socket: s.to_path_buf(),
                net: NetOptions {
                    mrg_rxbuf: mrg,
                    ..NetOptions::default()
                },
                ..NetVmOptions::default()
            })
            .unwrap();
            while queues_started(&sw, s) < before + 3 {
                std::thread::sleep(Duration::from_millis(5));
            }
            vm
        };
        let mut vms = vec![start(&sockets[0]), start(&sockets[1])];
        let b = vms[1].mac();
        let opts = TrafficOptions {
            rx_buffer_len: Some(512),
            drain: Duration::from_secs(1),
            ..TrafficOptions::default()
        };
        let r = net_load::run(&mut vms, &[flow(0, 1, b, 1500, 20)], &opts).unwrap();
        intact(&r[1]);
        if mrg {
            assert_eq!(from(&r[1], 1), 20, "{:?}", r[1]);
        } else {
            assert_eq!(r[1].rx_frames, 0, "{:?}", r[1]);
        }
        let r = net_load::run(&mut vms, &[flow(0, 2, b, 400, 20)], &opts).unwrap();
        assert_eq!(
            from(&r[1], 2),
            20,
            "small frames pass either way: {:?}",
            r[1]
        );
        drop(vms);
        let want = if mrg { "rx_too_big=0" } else { "rx_too_big=20" };
        let line = wait_for_counters(&sw, &sockets[1], &["rx_frames="]);
        assert!(line.contains(want), "{want}: {line}");
    }
}

/// A guest that boots again on the same ports (a new VMM connection, the
/// queues set up anew): the switch tells the guest's IOMMU daemon before
/// the queues' first DMA, and forwarding goes on, in table and in message
/// mode (where the daemon's answer arrives on the connection the private
/// IOTLB's thread reads).
#[test]
fn guests_boot_again_on_the_same_ports_in_table_and_message_mode() {
    for mode in ["table", "iotlb-msg"] {
        let dir = scratch(&format!("reboot-{mode}"));
        let iommus: Vec<Iommu> = (0..2)
            .map(|i| Iommu::start_named(&dir, &format!("iommu{i}"), &[]))
            .collect();
        let ports: Vec<String> = iommus
            .iter()
            .map(|i| {
                let m = if mode == "table" {
                    i.mode()
                } else {
                    i.msg_mode()
                };
                format!("iommu={m},endpoint={EP}")
            })
            .collect();
        let (sw, sockets) = switch(&dir, &ports, &[]);
        for boot in 0..2u32 {
            let mut vms: Vec<NetVm> = (0..2)
                .map(|i| vm(&sw, &sockets[i], Some(&iommus[i]), Policy::Lazy, None))
                .collect();
            let (a, b) = (vms[0].mac(), vms[1].mac());
            let r = traffic(
                &mut vms,
                &[flow(0, boot, b, 64, 50), flow(1, 10 + boot, a, 64, 50)],
            );
            assert_eq!(
                (from(&r[1], boot), from(&r[0], 10 + boot)),
                (50, 50),
                "{mode} boot {boot}: {r:?}"
            );
            intact(&r[0]);
            intact(&r[1]);
        }
        let told = sw.log_text().matches("the daemon was told").count();
        assert!(
            told >= 2,
            "{mode}: the daemons heard of the new boot:\n{}",
            sw.log_text()
        );
    }
}

/// QEMU's backend conventions: `--print-capabilities`, a refused command
/// line exits 2 naming the problem, SIGTERM ends the switch at once (its
/// polling threads busy) and removes its sockets.
#[test]
fn capabilities_bad_options_and_sigterm() {
    let bin = Path::new(env!("CARGO_BIN_EXE_vhost-user-net"));
    let out = std::process::Command::new(bin)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"type":"net"}"#
    );
    let out = std::process::Command::new(bin)
        .args(["--port", "socket=/x,iommu=table:/y"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("endpoint=ID is required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = scratch("sigterm");
    // Busy polling (no idle back-off): the signal still ends it at once.
    let (mut sw, sockets) = switch(&dir, &["".into(), "".into()], &["--idle-us", "0"]);
    let _guest = vm(&sw, &sockets[0], None, Policy::Off, None);
    let started = Instant::now();
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(sw.child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = sw.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{}", sw.log_text());
    assert!(sockets.iter().all(|s| !s.exists()), "sockets left behind");
}

/// Stock QEMU's virtio-net enables its queues before SET_FEATURES (at
/// every device reset). The `vhost` crate alone ends the connection there;
/// the switch's relay holds the enable until the features are set, and the
/// connection goes on.
#[test]
fn an_enable_before_set_features_as_qemu_sends_it_keeps_the_connection() {
    use std::io::{Read, Write};
    let dir = scratch("qemu-order");
    let (sw, sockets) = switch(&dir, &["".into()], &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&sockets[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let msg = |request: u32, payload: &[u8]| {
        let mut b = request.to_le_bytes().to_vec();
        b.extend_from_slice(&1u32.to_le_bytes()); // version 1
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b
    };
    let get_features = |s: &mut std::os::unix::net::UnixStream| -> std::io::Result<u64> {
        s.write_all(&msg(1, &[]))?;
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply)?;
        Ok(u64::from_le_bytes(reply[12..].try_into().unwrap()))
    };
    let offered = get_features(&mut s).unwrap();
    assert_ne!(offered & (1 << 30), 0, "PROTOCOL_FEATURES offered");
    s.write_all(&msg(3, &[])).unwrap(); // SET_OWNER
    // SET_VRING_ENABLE queue 0, on: before any SET_FEATURES.
    s.write_all(&msg(18, &[0, 0, 0, 0, 1, 0, 0, 0])).unwrap();
    s.write_all(&msg(2, &offered.to_le_bytes())).unwrap(); // SET_FEATURES
    assert_eq!(
        get_features(&mut s).unwrap(),
        offered,
        "the connection is alive"
    );
    drop(s);
    sw.wait_for_log("VMM disconnected", Duration::from_secs(5));
    assert!(
        !sw.log_text().contains("ended with an error"),
        "{}",
        sw.log_text()
    );
}
