//! The daemon as a vhost-user device, driven by `viommu-frontend` over a
//! real socket, with guest RAM in a real memfd and real eventfds. Tests are
//! named after the conformance IDs they check
//! (`../shared/spec/virtio-iommu-conformance.md`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Daemon;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserProtocolFeatures;
use viommu_frontend::connection::{Connection, WANTED_PROTOCOL_FEATURES};
use viommu_frontend::driver::chain_for;
use viommu_frontend::split_ring::{
    ChainSpec, Descriptor, RawDesc, RawNext, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use viommu_frontend::{Driver, DriverOptions, Layout, Outcome};
use virtio_iommu_proto::probe::{Property, parse_properties};
use virtio_iommu_proto::{
    Attach, ConfigSpace, Detach, DomainRange, InputRange, Map, MapFlags, Probe, Request, ResvMem,
    ResvSubtype, Status, Unmap,
};
use vm_memory::Bytes;

fn opts() -> DriverOptions {
    DriverOptions {
        // Small RAM keeps the "outside RAM" addresses easy to name.
        ram_size: 64 << 20,
        timeout: Duration::from_secs(5),
        ..DriverOptions::default()
    }
}

fn driver(d: &Daemon) -> Driver {
    Driver::connect(&d.socket, opts()).expect("device comes up")
}

fn socket(d: &Daemon) -> PathBuf {
    d.socket.clone()
}

fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach(Attach {
        domain,
        endpoint,
        flags: 0,
        reserved: [0; 4],
    })
}

fn detach(domain: u32, endpoint: u32) -> Request {
    Request::Detach(Detach { domain, endpoint })
}

fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64) -> Request {
    Request::Map(Map {
        domain,
        virt_start,
        virt_end,
        phys_start,
        flags: MapFlags(3),
    })
}

fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Request {
    Request::Unmap(Unmap {
        domain,
        virt_start,
        virt_end,
        reserved: [0; 4],
    })
}

fn probe(endpoint: u32) -> Request {
    Request::Probe(Probe { endpoint })
}

fn statuses(outs: &[Outcome]) -> Vec<Option<Status>> {
    outs.iter().map(Outcome::status).collect()
}

/// The daemon still answers a fresh, valid request.
fn still_serving(drv: &mut Driver) {
    let o = drv.send_one(&probe(8)).expect("daemon still serving");
    assert_eq!(o.status(), Some(Status::Ok), "{o:?}");
}

const DEFAULT_CONFIG: ConfigSpace = ConfigSpace {
    page_size_mask: !0xfff,
    input_range: InputRange {
        start: 0,
        end: (1 << 48) - 1,
    },
    domain_range: DomainRange {
        start: 0,
        end: 0xffff,
    },
    probe_size: 512,
    bypass: 1,
};

#[test]
fn dev_vq_1_two_queues_and_the_protocol_features_used() {
    let d = Daemon::start("vq1", &[]);
    let mut conn = Connection::connect(&socket(&d)).unwrap();
    assert_eq!(conn.protocol_features(), WANTED_PROTOCOL_FEATURES);
    assert!(
        conn.protocol_features()
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
    );
    assert_eq!(conn.queue_num().unwrap(), 2, "requestq and eventq only");
}

#[test]
fn dev_feat_1_2_3_offered_feature_bits() {
    let bits = |v: &[u32]| v.iter().fold(0u64, |a, &b| a | (1 << b));
    let offered = |extra: &[&str]| {
        let d = Daemon::start(&format!("feat{}", extra.len()), extra);
        Connection::connect(&socket(&d)).unwrap().offered_features()
    };
    // Defaults: VERSION_1, PROTOCOL_FEATURES, INDIRECT, EVENT_IDX and the
    // device bits MAP_UNMAP, INPUT_RANGE, DOMAIN_RANGE, PROBE, BYPASS_CONFIG.
    let f = offered(&[]);
    assert_eq!(f, bits(&[0, 1, 2, 4, 6, 28, 29, 30, 32]), "{f:#x}");
    assert_eq!(f & (1 << 3), 0, "DEV-FEAT-2: no legacy F_BYPASS");
    // Compat switch: legacy bypass instead of BYPASS_CONFIG, never both.
    let f = offered(&["--legacy-bypass", "--mmio"]);
    assert_ne!(f & (1 << 3), 0, "{f:#x}");
    assert_eq!(f & (1 << 6), 0, "DEV-FEAT-3: {f:#x}");
    assert_ne!(f & (1 << 5), 0, "F_MMIO when asked");
    // Optional fields not offered when switched off; MAP_UNMAP always is.
    let f = offered(&[
        "--input-range",
        "none",
        "--domain-range",
        "none",
        "--probe-size",
        "0",
    ]);
    assert_eq!(f & bits(&[0, 1, 4]), 0, "{f:#x}");
    assert_ne!(f & (1 << 2), 0, "DEV-FEAT-1");
    assert_eq!(f & 0x00ff_ff80, 0, "no device bit 7..=23");
}

#[test]
fn dev_cfg_1_7_8_config_space_before_features_ok_is_the_documented_default() {
    let d = Daemon::start("cfg7", &[]);
    let mut conn = Connection::connect(&socket(&d)).unwrap();
    assert_eq!(conn.acked_features(), None, "before SET_FEATURES");
    let bytes = conn.config_bytes().unwrap();
    assert_eq!(bytes, DEFAULT_CONFIG.to_bytes());
    assert_ne!(
        ConfigSpace::from_bytes(&bytes).page_size_mask,
        0,
        "DEV-CFG-1"
    );
    // Partial reads at any offset agree with the whole.
    assert_eq!(
        conn.read_config(0x20, 8).unwrap(),
        bytes[0x20..0x28].to_vec()
    );
}

#[test]
fn dev_cfg_3_8_config_space_follows_the_daemon_options() {
    let d = Daemon::start(
        "cfg8",
        &[
            "--page-size-mask",
            "0x40201000",
            "--input-range",
            "0x1000-0xffffffff",
            "--domain-range",
            "1-100",
            "--probe-size",
            "64",
            "--bypass",
            "off",
        ],
    );
    let cfg = Connection::connect(&socket(&d)).unwrap().config().unwrap();
    assert_eq!(
        cfg,
        ConfigSpace {
            page_size_mask: 0x4020_1000,
            input_range: InputRange {
                start: 0x1000,
                end: 0xffff_ffff
            },
            domain_range: DomainRange { start: 1, end: 100 },
            probe_size: 64,
            bypass: 0,
        }
    );
}

#[test]
fn drv_cfg_1_writing_the_bypass_byte_changes_only_that_byte() {
    let d = Daemon::start("cfg6a", &[]);
    let mut drv = driver(&d);
    let conn = drv.connection();
    let before = conn.config_bytes().unwrap();
    conn.set_bypass(false).unwrap();
    let mut after = before;
    after[0x24] = 0;
    assert_eq!(conn.config_bytes().unwrap(), after);
    conn.set_bypass(true).unwrap();
    assert_eq!(conn.config_bytes().unwrap(), before);
    still_serving(&mut drv);
}

#[test]
fn drv_cfg_1_dev_cfg_6_refused_config_writes_change_nothing_and_keep_the_device() {
    let d = Daemon::start("cfg6b", &[]);
    let mut drv = driver(&d);
    assert_eq!(
        drv.send_one(&attach(1, 8)).unwrap().status(),
        Some(Status::Ok)
    );
    let conn = drv.connection();
    let before = conn.config_bytes().unwrap();
    for (offset, bytes) in [
        (0u32, vec![0u8; 8]),
        (0x08, vec![0x10, 0, 0, 0, 0, 0, 0, 0]),
        (0x18, vec![5, 0, 0, 0]),
        (0x20, vec![0, 1, 0, 0]),
        (0x25, vec![1]),
        (0x24, vec![0, 0, 0, 0]),
        (0x24, vec![0xff]),
    ] {
        // Refused or ignored, the device must not change or go away.
        let _ = conn.write_config(offset, &bytes);
        let now = conn
            .config_bytes()
            .unwrap_or_else(|e| panic!("after a write of {bytes:?} at {offset:#x}: {e}"));
        assert_eq!(now, before, "write of {bytes:?} at {offset:#x}");
    }
    // Same device: the domain is still there.
    let o = drv.send_one(&map(1, 0x10000, 0x10fff, 0)).unwrap();
    assert_eq!(o.status(), Some(Status::Ok));
}

#[test]
fn dev_cfg_4_dev_init_1_device_reset_drops_domains_and_keeps_bypass() {
    let d = Daemon::start("cfg4", &[]);
    let mut drv = driver(&d);
    let outs = drv
        .send(&[attach(1, 8), map(1, 0x10000, 0x1ffff, 0x80000)])
        .unwrap();
    assert_eq!(statuses(&outs), vec![Some(Status::Ok); 2]);
    drv.connection().set_bypass(false).unwrap();
    drv.reset().unwrap();
    assert_eq!(drv.config().bypass, 0, "DEV-CFG-4: bypass survives reset");
    assert_eq!(drv.connection().config().unwrap().bypass, 0);
    let o = drv.send_one(&map(1, 0x30000, 0x30fff, 0)).unwrap();
    assert_eq!(o.status(), Some(Status::NoEnt), "DEV-INIT-1: domain gone");
    // The old mapping went with it: the same range maps again.
    let outs = drv
        .send(&[attach(1, 8), map(1, 0x10000, 0x1ffff, 0x80000)])
        .unwrap();
    assert_eq!(statuses(&outs), vec![Some(Status::Ok); 2]);
}

#[test]
fn dev_cfg_5_disconnect_and_reconnect_gives_a_fresh_device() {
    let d = Daemon::start("cfg5", &[]);
    {
        let mut drv = driver(&d);
        let outs = drv
            .send(&[attach(1, 8), map(1, 0x10000, 0x1ffff, 0x80000)])
            .unwrap();
        assert_eq!(statuses(&outs), vec![Some(Status::Ok); 2]);
        drv.connection().set_bypass(false).unwrap();
    }
    let mut drv = driver(&d);
    assert_eq!(
        drv.config(),
        DEFAULT_CONFIG,
        "bypass back to its initial value"
    );
    let o = drv.send_one(&map(1, 0x30000, 0x30fff, 0)).unwrap();
    assert_eq!(o.status(), Some(Status::NoEnt), "no domain survives");
}

#[test]
fn dev_ops_1_4_dev_gen_2_exact_used_lengths_and_zero_tail_reserved() {
    let d = Daemon::start("ops1", &[]);
    let mut drv = driver(&d);
    // Every writable byte is pre-filled with 0xaa by the driver.
    let outs = drv
        .send(&[
            attach(1, 8),
            map(1, 0x10000, 0x1ffff, 0x80000),
            unmap(1, 0x10000, 0x1ffff),
            map(7, 0x10000, 0x1ffff, 0x80000),
            detach(1, 8),
        ])
        .unwrap();
    for o in &outs {
        assert_eq!(o.used_len, 4, "{o:?}");
        assert_eq!(o.writable[1..], [0, 0, 0], "tail reserved written as 0");
    }
    assert_eq!(
        statuses(&outs),
        [
            Status::Ok,
            Status::Ok,
            Status::Ok,
            Status::NoEnt,
            Status::Ok
        ]
        .map(Some)
    );
    let o = drv.send_one(&probe(8)).unwrap();
    assert_eq!(o.used_len, 512 + 4, "PROBE: probe_size + 4");
    assert_eq!(o.tail(), Some([0, 0, 0, 0]));
    assert_eq!(
        parse_properties(o.properties()),
        vec![Property::ResvMem(ResvMem {
            subtype: ResvSubtype::Msi,
            start: 0xfee0_0000,
            end: 0xfeef_ffff
        })]
    );
    assert!(o.properties()[24..].iter().all(|&b| b == 0), "zero-filled");
    let o = drv.send_one(&probe(0x1_0000)).unwrap();
    assert_eq!((o.used_len, o.status()), (516, Some(Status::NoEnt)));
}

#[test]
fn dev_ops_2_unknown_request_types_are_returned_untouched() {
    let d = Daemon::start("ops2", &[]);
    let mut drv = driver(&d);
    let specs: Vec<ChainSpec> = [0u8, 6, 7, 0x80, 0xff]
        .iter()
        .map(|&t| {
            let mut readable = vec![0u8; 36];
            readable[0] = t;
            ChainSpec::with_layout(readable, 4, Layout::Two, &[], &[])
        })
        .collect();
    for o in drv.send_chains(&specs).unwrap() {
        assert_eq!(o.used_len, 0, "{o:?}");
        assert_eq!(o.writable, vec![0xaa; 4], "nothing written");
    }
    still_serving(&mut drv);
}

#[test]
fn dev_ops_3_head_reserved_bytes_are_ignored() {
    let d = Daemon::start("ops3", &[]);
    let mut drv = driver(&d);
    let specs: Vec<ChainSpec> = [attach(1, 8), map(1, 0x10000, 0x1ffff, 0x80000)]
        .iter()
        .map(|r| {
            let mut s = chain_for(r, 512, Layout::Two);
            s.readable[1..4].copy_from_slice(&[0xff; 3]);
            s
        })
        .collect();
    let outs = drv.send_chains(&specs).unwrap();
    assert_eq!(statuses(&outs), vec![Some(Status::Ok); 2]);
}

/// Requests with a known answer each, successes and failures mixed, in
/// one batch (the device must process them in order).
fn layout_script() -> (Vec<Request>, Vec<Status>) {
    use Status::*;
    let script = [
        (probe(8), Ok),
        (attach(1, 8), Ok),
        (map(1, 0x10000, 0x1ffff, 0x80000), Ok),
        (map(1, 0x18000, 0x27fff, 0x90000), Inval), // overlap
        (map(1, 0x31000, 0x31fff, 0x1800), Range),  // misaligned phys
        (map(2, 0x10000, 0x1ffff, 0x80000), NoEnt), // no such domain
        (map(1, 0x20000, 0x2ffff, 0xa0000), Ok),
        (unmap(1, 0x10000, 0x17fff), Range), // would split
        (unmap(1, 0x10000, 0x2ffff), Ok),
        (detach(9, 8), Inval), // not in that domain
        (probe(0x1_0000), NoEnt),
        (detach(1, 8), Ok),
        (map(1, 0x10000, 0x1ffff, 0x80000), NoEnt), // domain gone
    ];
    script.into_iter().unzip()
}

#[test]
fn dev_gen_1_every_descriptor_layout_gives_the_same_results() {
    let d = Daemon::start("gen1", &[]);
    let mut drv = driver(&d);
    let (reqs, want) = layout_script();
    let mut reference: Option<Vec<Outcome>> = None;
    for layout in [
        Layout::Two,
        Layout::PerField,
        Layout::Chunks(1), // every byte its own descriptor
        Layout::Chunks(3), // le64 fields cut in the middle
        Layout::Chunks(5),
        Layout::Indirect,
    ] {
        drv.reset().unwrap();
        drv.set_layout(layout);
        let outs = drv.send(&reqs).unwrap();
        let got: Vec<Status> = outs.iter().map(|o| o.status().unwrap()).collect();
        assert_eq!(got, want, "{layout:?}");
        match &reference {
            None => reference = Some(outs),
            Some(r) => assert_eq!(&outs, r, "{layout:?}: same bytes and used lengths"),
        }
    }
}

#[test]
fn dev_ops_6_chains_without_a_writable_part_are_returned_untouched() {
    let d = Daemon::start("ops6a", &[]);
    let mut drv = driver(&d);
    let ram = drv.ram();
    let buf = ram.alloc(64, 8).unwrap();
    ram.mem().write_slice(&attach(3, 8).encode(), buf).unwrap();
    let chains = vec![
        vec![RawDesc {
            addr: buf.0,
            len: 20,
            flags: 0,
            next: RawNext::Auto,
        }],
        vec![
            RawDesc {
                addr: buf.0,
                len: 4,
                flags: 0,
                next: RawNext::Auto,
            },
            RawDesc {
                addr: buf.0 + 4,
                len: 16,
                flags: 0,
                next: RawNext::Auto,
            },
        ],
    ];
    for o in drv.send_raw(&chains).unwrap() {
        assert_eq!(o.used_len, 0, "{o:?}");
    }
    // No state change: the ATTACH did not happen.
    let o = drv.send_one(&map(3, 0x10000, 0x10fff, 0)).unwrap();
    assert_eq!(o.status(), Some(Status::NoEnt));
    still_serving(&mut drv);
}

#[test]
fn dev_ops_6_writable_part_shorter_than_the_tail_is_returned_untouched() {
    let d = Daemon::start("ops6b", &[]);
    let mut drv = driver(&d);
    let ram = drv.ram();
    let req = ram.alloc(64, 8).unwrap();
    let out = ram.alloc(64, 8).unwrap();
    ram.mem().write_slice(&attach(3, 8).encode(), req).unwrap();
    ram.mem().write_slice(&[0xaa; 64], out).unwrap();
    let readable = RawDesc {
        addr: req.0,
        len: 20,
        flags: 0,
        next: RawNext::Auto,
    };
    let w = |addr: u64, len: u32| RawDesc {
        addr,
        len,
        flags: VRING_DESC_F_WRITE,
        next: RawNext::Auto,
    };
    let chains = vec![
        vec![readable, w(out.0, 3)],
        vec![readable, w(out.0 + 16, 2), w(out.0 + 32, 1)],
        vec![readable, w(out.0 + 48, 0)],
    ];
    for o in drv.send_raw(&chains).unwrap() {
        assert_eq!(o.used_len, 0, "{o:?}");
        assert!(o.writable.iter().all(|&b| b == 0xaa), "untouched: {o:?}");
    }
    let o = drv.send_one(&map(3, 0x10000, 0x10fff, 0)).unwrap();
    assert_eq!(o.status(), Some(Status::NoEnt), "the ATTACH did not happen");
    still_serving(&mut drv);
}

#[test]
fn amb_9_readable_part_too_short() {
    let d = Daemon::start("amb9", &[]);
    let mut drv = driver(&d);
    let full = map(1, 0x10000, 0x1ffff, 0x80000).encode();
    let short = |n: usize| ChainSpec::with_layout(full[..n].to_vec(), 4, Layout::Two, &[], &[]);
    let outs = drv.send_chains(&[short(20), short(35), short(2)]).unwrap();
    // Head readable, fields cut short: INVAL with the tail written.
    assert_eq!(
        (outs[0].used_len, outs[0].status()),
        (4, Some(Status::Inval))
    );
    assert_eq!(
        (outs[1].used_len, outs[1].status()),
        (4, Some(Status::Inval))
    );
    // No head: returned untouched.
    assert_eq!(outs[2].used_len, 0);
    assert_eq!(outs[2].writable, vec![0xaa; 4]);
    // Extra readable bytes are ignored.
    let mut long = attach(1, 8).encode();
    long.extend_from_slice(&[0xee; 12]);
    let o = drv
        .send_chains(&[ChainSpec::with_layout(long, 4, Layout::Two, &[], &[])])
        .unwrap();
    assert_eq!(o[0].status(), Some(Status::Ok));
}

#[test]
fn invariant_5_buffers_outside_guest_ram_are_refused() {
    let d = Daemon::start("outside", &[]);
    let mut drv = driver(&d);
    let end = drv.ram().size();
    let ram = drv.ram();
    let req = ram.alloc(64, 8).unwrap();
    let out = ram.alloc(64, 8).unwrap();
    ram.mem().write_slice(&probe(8).encode(), req).unwrap();
    ram.mem().write_slice(&[0xaa; 64], out).unwrap();
    let r = |addr: u64, len: u32| RawDesc {
        addr,
        len,
        flags: 0,
        next: RawNext::Auto,
    };
    let w = |addr: u64, len: u32| RawDesc {
        addr,
        len,
        flags: VRING_DESC_F_WRITE,
        next: RawNext::Auto,
    };
    let cases = [
        (
            "readable past the end of RAM",
            vec![r(end, 72), w(out.0, 516)],
        ),
        (
            "readable straddling the end",
            vec![r(end - 8, 72), w(out.0, 516)],
        ),
        (
            "readable wrapping u64",
            vec![r(u64::MAX - 3, 72), w(out.0, 516)],
        ),
        (
            "huge readable length",
            vec![r(req.0, u32::MAX), w(out.0, 516)],
        ),
        (
            "writable past the end",
            vec![r(req.0, 72), w(end + 0x1000, 516)],
        ),
        (
            "writable wrapping u64",
            vec![r(req.0, 72), w(u64::MAX - 1, 516)],
        ),
        (
            "tail outside RAM",
            vec![r(req.0, 72), w(out.0, 512), w(end, 4)],
        ),
    ];
    for (what, chain) in cases {
        let outs = drv
            .send_raw(&[chain])
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(outs[0].used_len, 0, "{what}");
        let mut b = [0u8; 64];
        drv.ram().mem().read_slice(&mut b, out).unwrap();
        assert_eq!(b, [0xaa; 64], "{what}: nothing written in RAM");
    }
    still_serving(&mut drv);
}

#[test]
fn dev_ops_6_a_request_whose_tail_is_outside_ram_has_no_effect() {
    let d = Daemon::start("tailout", &[]);
    let mut drv = driver(&d);
    let end = drv.ram().size();
    let req = drv.ram().alloc(64, 8).unwrap();
    drv.ram()
        .mem()
        .write_slice(&attach(5, 8).encode(), req)
        .unwrap();
    let chain = vec![
        RawDesc {
            addr: req.0,
            len: 20,
            flags: 0,
            next: RawNext::Auto,
        },
        RawDesc {
            addr: end,
            len: 4,
            flags: VRING_DESC_F_WRITE,
            next: RawNext::Auto,
        },
    ];
    let outs = drv.send_raw(&[chain]).unwrap();
    assert_eq!(outs[0].used_len, 0);
    let o = drv.send_one(&map(5, 0x10000, 0x10fff, 0)).unwrap();
    assert_eq!(
        o.status(),
        Some(Status::NoEnt),
        "ATTACH with an unwritable tail was applied although returned unused"
    );
}

#[test]
fn invariant_5_hostile_descriptor_chains_and_indirect_tables() {
    let d = Daemon::start("hostile", &[]);
    let mut drv = driver(&d);
    let ram = drv.ram();
    let req = ram.alloc(64, 8).unwrap();
    let out = ram.alloc(64, 8).unwrap();
    let table = ram.alloc(4096, 16).unwrap();
    let end = ram.size();
    ram.mem().write_slice(&attach(3, 8).encode(), req).unwrap();
    let rd = Descriptor {
        addr: req.0,
        len: 20,
        flags: 0,
        next: 0,
    };
    let wd = Descriptor {
        addr: out.0,
        len: 4,
        flags: VRING_DESC_F_WRITE,
        next: 0,
    };
    let ind = |addr: u64, len: u32| {
        vec![RawDesc {
            addr,
            len,
            flags: VRING_DESC_F_INDIRECT,
            next: RawNext::Auto,
        }]
    };
    // (what, indirect table contents, ring chain)
    let looped = vec![
        Descriptor {
            flags: VRING_DESC_F_NEXT,
            next: 1,
            ..rd
        },
        Descriptor {
            flags: VRING_DESC_F_NEXT,
            next: 0,
            ..rd
        },
    ];
    let looped_writable = vec![
        Descriptor {
            flags: VRING_DESC_F_NEXT,
            next: 1,
            ..rd
        },
        Descriptor {
            flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            next: 1,
            ..wd
        },
    ];
    let nested = vec![
        Descriptor {
            flags: VRING_DESC_F_NEXT,
            next: 1,
            ..rd
        },
        Descriptor {
            addr: table.0,
            len: 32,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
    ];
    let next_out_of_table = vec![
        Descriptor {
            flags: VRING_DESC_F_NEXT,
            next: 7,
            ..rd
        },
        wd,
    ];
    let cases: Vec<(&str, Vec<Descriptor>, Vec<RawDesc>)> = vec![
        ("indirect loop (readable)", looped, ind(table.0, 32)),
        (
            "indirect loop (writable)",
            looped_writable,
            ind(table.0, 32),
        ),
        ("indirect inside indirect", nested, ind(table.0, 32)),
        (
            "indirect next past the table",
            next_out_of_table,
            ind(table.0, 32),
        ),
        (
            "indirect length not a multiple of 16",
            vec![rd, wd],
            ind(table.0, 20),
        ),
        ("indirect length 0", vec![rd, wd], ind(table.0, 0)),
        ("indirect table outside RAM", vec![], ind(end, 32)),
        (
            "indirect table wrapping u64",
            vec![],
            ind(u64::MAX - 15, 32),
        ),
        (
            "indirect table too long",
            vec![rd, wd],
            ind(table.0, 0x10_0000),
        ),
        (
            "direct loop",
            vec![],
            vec![
                RawDesc {
                    addr: req.0,
                    len: 20,
                    flags: 0,
                    next: RawNext::ChainIndex(1),
                },
                RawDesc {
                    addr: out.0,
                    len: 4,
                    flags: VRING_DESC_F_WRITE,
                    next: RawNext::ChainIndex(0),
                },
            ],
        ),
        (
            "direct next out of the ring",
            vec![],
            vec![RawDesc {
                addr: req.0,
                len: 20,
                flags: 0,
                next: RawNext::Id(0xffff),
            }],
        ),
    ];
    for (what, contents, chain) in cases {
        viommu_frontend::split_ring::write_table(drv.ram().mem(), table, &contents).unwrap();
        let outs = drv
            .send_raw(&[chain])
            .unwrap_or_else(|e| panic!("{what}: chain never returned: {e}"));
        assert!(
            outs[0].used_len <= 4,
            "{what}: used length {} beyond the writable part",
            outs[0].used_len
        );
        still_serving(&mut drv);
    }
}

#[test]
fn dev_map_nomem_a_flood_of_maps_past_the_limit() {
    let d = Daemon::start("nomem", &["--max-mappings-per-domain", "64"]);
    let mut drv = driver(&d);
    assert_eq!(
        drv.send_one(&attach(1, 8)).unwrap().status(),
        Some(Status::Ok)
    );
    let page = |i: u64| map(1, i << 12, (i << 12) | 0xfff, i << 12);
    let flood: Vec<Request> = (1..=100).map(page).collect();
    let outs = drv.send(&flood).unwrap();
    let got = statuses(&outs);
    assert_eq!(got[..64], vec![Some(Status::Ok); 64]);
    assert_eq!(got[64..], vec![Some(Status::NoMem); 36]);
    // The limit is a count, not a leak: free one, one more fits.
    let outs = drv
        .send(&[unmap(1, 0x1000, 0x1fff), page(200), page(201)])
        .unwrap();
    assert_eq!(
        statuses(&outs),
        [Status::Ok, Status::Ok, Status::NoMem].map(Some)
    );
    still_serving(&mut drv);
}

#[test]
fn dev_vq_1_event_buffers_are_used_only_for_fault_records() {
    // No request makes the device model report a fault (the daemon has no
    // fault source yet), so the event queue must stay untouched.
    let d = Daemon::start("eventq", &[]);
    let mut drv = driver(&d);
    drv.post_event_buffers(8, 24).unwrap();
    let outs = drv
        .send(&[
            map(5, 0x1000, 0x1fff, 0),
            attach(1, 8),
            detach(2, 8),
            probe(0x2_0000),
        ])
        .unwrap();
    assert_eq!(outs.len(), 4);
    assert!(
        drv.take_events(Duration::from_millis(100))
            .unwrap()
            .is_empty()
    );
    assert_eq!(drv.event_buffers_posted(), 8);
}

#[test]
fn notification_schemes_and_ring_wraparound() {
    // With and without EVENT_IDX, more requests than the ring holds (the
    // driver drains and reuses descriptors, indices wrap past the size).
    let d = Daemon::start("notify", &[]);
    for event_idx in [false, true] {
        let mut drv = Driver::connect(
            &socket(&d),
            DriverOptions {
                event_idx,
                queue_size: 16,
                ..opts()
            },
        )
        .unwrap();
        assert_eq!(drv.acked_features() & (1 << 29) != 0, event_idx);
        let mut reqs = vec![attach(1, 8)];
        for i in 1..=200u64 {
            reqs.push(map(1, i << 12, (i << 12) | 0xfff, 0));
            reqs.push(unmap(1, i << 12, (i << 12) | 0xfff));
        }
        let outs = drv.send(&reqs).unwrap();
        assert!(outs.iter().all(|o| o.status() == Some(Status::Ok)));
        drop(drv);
    }
}

/// A request queue driven by hand: features (no EVENT_IDX), memory table
/// and a 16-entry ring set up, not enabled yet.
struct RawQueue {
    conn: Connection,
    ram: viommu_frontend::memory::GuestRam,
    ring: viommu_frontend::split_ring::SplitRing,
    kick: vmm_sys_util::eventfd::EventFd,
    _call: vmm_sys_util::eventfd::EventFd,
}

fn raw_queue(d: &Daemon) -> RawQueue {
    use viommu_frontend::connection::linux_driver_features;
    use viommu_frontend::memory::GuestRam;
    use viommu_frontend::split_ring::SplitRing;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    let mut conn = Connection::connect(&socket(d)).unwrap();
    let mut ram = GuestRam::new(16 << 20).unwrap();
    let ring = SplitRing::new(&mut ram, 16, false).unwrap();
    let (kick, call) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    conn.set_features(linux_driver_features(conn.offered_features(), false))
        .unwrap();
    conn.set_mem_table(&ram).unwrap();
    conn.setup_vring(0, &ram, &ring.addrs(), &kick, &call)
        .unwrap();
    RawQueue {
        conn,
        ram,
        ring,
        kick,
        _call: call,
    }
}

#[test]
fn dev_gen_3_nothing_is_used_before_the_ring_is_enabled() {
    let d = Daemon::start("gen3", &[]);
    let RawQueue {
        mut conn,
        ram,
        mut ring,
        kick,
        ..
    } = raw_queue(&d);
    // Posted and kicked while the ring is still disabled.
    ring.add(ram.mem(), &chain_for(&attach(1, 8), 512, Layout::Two))
        .unwrap();
    assert!(ring.publish(ram.mem()).unwrap());
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ring.used_idx(ram.mem()).unwrap(), 0, "nothing used yet");
    // Enabling it lets the device serve what is already there.
    conn.enable_vring(0, true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let used = loop {
        if let Some(u) = ring.pop_used(ram.mem()).unwrap() {
            break u;
        }
        assert!(Instant::now() < deadline, "served after SET_VRING_ENABLE");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((used.len, used.writable), (4, vec![0, 0, 0, 0]));
}

/// A request whose kick never comes (a driver or transport bug) is still
/// served, by the io_uring thread's watchdog, and the daemon says so.
#[test]
fn a_request_without_a_kick_is_served_by_the_watchdog_and_logged() {
    let d = Daemon::start("nokick", &["--log-level", "debug"]);
    let RawQueue {
        mut conn,
        ram,
        mut ring,
        ..
    } = raw_queue(&d);
    conn.enable_vring(0, true).unwrap();
    // Let the daemon take the kick eventfd over and go idle.
    std::thread::sleep(Duration::from_millis(50));
    ring.add(ram.mem(), &chain_for(&attach(1, 8), 512, Layout::Two))
        .unwrap();
    ring.publish(ram.mem()).unwrap(); // and no kick
    let deadline = Instant::now() + Duration::from_secs(5);
    let used = loop {
        if let Some(u) = ring.pop_used(ram.mem()).unwrap() {
            break u;
        }
        assert!(Instant::now() < deadline, "never served:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((used.len, used.writable), (4, vec![0, 0, 0, 0]));
    // The warning is written once the pass that served it has returned.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log().contains("served by the watchdog") {
        assert!(Instant::now() < deadline, "no warning:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains(" WARN ") && l.contains("served by the watchdog")),
        "{log}"
    );
}

/// A kick that comes late — the driver published, then was descheduled
/// long enough for the watchdog to serve the request — is not a lost kick:
/// nothing is warned about or counted.
#[test]
fn a_kick_that_comes_after_the_watchdog_served_is_late_not_lost() {
    let d = Daemon::start("latekick", &["--log-level", "debug"]);
    let RawQueue {
        mut conn,
        ram,
        mut ring,
        kick,
        ..
    } = raw_queue(&d);
    conn.enable_vring(0, true).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    ring.add(ram.mem(), &chain_for(&attach(1, 8), 512, Layout::Two))
        .unwrap();
    ring.publish(ram.mem()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ring.pop_used(ram.mem()).unwrap().is_none() {
        assert!(Instant::now() < deadline, "never served:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(1));
    }
    // The kick, at last (well within the watchdog's next interval).
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log().contains("came late: not lost") {
        assert!(Instant::now() < deadline, "not seen as late:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = d.log();
    assert!(!log.contains("served by the watchdog"), "{log}");
}

/// Both kick paths serve the same requests with the same results; with the
/// default (`uring`) the request queue's kick eventfd really moves to the
/// io_uring thread, including after a device reset and a reconnect, with
/// polling and CPU pinning on.
#[test]
fn both_kick_loops_serve_the_request_queue_and_uring_owns_the_kick() {
    let (reqs, want) = layout_script();
    for (name, extra) in [
        ("epoll", &["--kick-loop", "epoll"][..]),
        ("uring", &["--log-level", "debug", "--poll-us", "0"][..]),
        ("uringdefault", &["--log-level", "debug"][..]),
        (
            "uringpoll",
            &["--log-level", "debug", "--poll-us", "20", "--cpu", "0"][..],
        ),
    ] {
        let d = Daemon::start(&format!("kick-{name}"), extra);
        for _connection in 0..2 {
            let mut drv = driver(&d);
            for _ in 0..2 {
                drv.reset().unwrap();
                let got: Vec<Status> = drv
                    .send(&reqs)
                    .unwrap()
                    .iter()
                    .map(|o| o.status().unwrap())
                    .collect();
                assert_eq!(got, want, "{name}");
            }
            // Many small batches: every kick is seen.
            for i in 0..300u64 {
                let o = drv.send_one(&probe(8)).unwrap();
                assert_eq!(o.status(), Some(Status::Ok), "{name} request {i}");
            }
        }
        let log = d.log();
        let handed = log.matches("handed to the io_uring thread").count();
        assert!(
            !log.contains("served by the watchdog"),
            "a kick was lost:\n{log}"
        );
        if name == "epoll" {
            assert_eq!(handed, 0, "{log}");
        } else {
            assert!(
                handed >= 2,
                "kick eventfd not taken over on each connection:\n{log}"
            );
            assert!(!log.contains("io_uring unavailable"), "{log}");
        }
    }
}

/// The framework's epoll thread survives a kick event whose eventfd is
/// empty when it reads it. The io_uring kick loop makes that a race (the
/// enable notification hands the kick eventfd over, the io_uring thread
/// reads the count, then the epoll thread handles the kick event it had
/// collected in the same `epoll_wait`); lost, the thread took every later
/// hand-over with it, and each request of the connection waited for the
/// watchdog. Here it is made certain: the VMM gives the running request
/// queue a new kick eventfd, the driver kicks the old one (which the
/// framework still watches), and the framework reads the new, empty one.
/// The device then serves, across a reset too.
#[test]
fn a_kick_event_finding_its_eventfd_empty_does_not_stop_the_queues() {
    use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};
    let d = Daemon::start("empty-kick", &["--kick-loop", "epoll", "--poll-us", "0"]);
    let mut drv = driver(&d);
    assert_eq!(drv.send_one(&probe(8)).unwrap().status(), Some(Status::Ok));
    let fresh = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
    drv.connection()
        .set_vring_kick(usize::from(virtio_iommu_proto::REQUEST_QUEUE), &fresh)
        .unwrap();
    for i in 0..3 {
        let o = drv.send_one(&probe(8));
        assert!(
            matches!(&o, Ok(o) if o.status() == Some(Status::Ok)),
            "request {i} after an empty kick read: {o:?}\n{}",
            d.log()
        );
    }
    // The reset closes the old kick eventfd; the new one is served.
    drv.reset().unwrap();
    for i in 0..3 {
        let o = drv.send_one(&probe(8));
        assert!(
            matches!(&o, Ok(o) if o.status() == Some(Status::Ok)),
            "request {i} after the reset: {o:?}\n{}",
            d.log()
        );
    }
}
