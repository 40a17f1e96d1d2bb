use super::*;
use crate::config::DeviceConfig;
use virtio_iommu_proto::features::{VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_MAP_UNMAP};
use virtio_iommu_proto::request::VIRTIO_IOMMU_ATTACH_F_BYPASS;
use virtio_iommu_proto::{Detach, MapFlags, Unmap};

fn cfg() -> DeviceConfig {
    DeviceConfig::default()
}

/// Every offered feature, as Linux acks them (MAP_UNMAP and BYPASS_CONFIG
/// among them).
fn features(d: &Device) -> u64 {
    let f = d.offered_features().0;
    assert_ne!(f & (1 << VIRTIO_IOMMU_F_MAP_UNMAP), 0);
    assert_ne!(f & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG), 0);
    f
}

fn attach(domain: u32, endpoint: u32, flags: u32) -> Request {
    Request::Attach(Attach {
        domain,
        endpoint,
        flags,
        reserved: [0; 4],
    })
}

fn map(domain: u32, start: u64, pages: u64, phys: u64) -> Request {
    Request::Map(Map {
        domain,
        virt_start: start,
        virt_end: start + pages * 4096 - 1,
        phys_start: phys,
        flags: MapFlags(MapFlags::READ.0 | MapFlags::WRITE.0),
    })
}

fn unmap(domain: u32, start: u64, pages: u64) -> Request {
    Request::Unmap(Unmap {
        domain,
        virt_start: start,
        virt_end: start + pages * 4096 - 1,
        reserved: [0; 4],
    })
}

/// The requests of a guest that set up three domains, one of them bypass.
fn history() -> Vec<Request> {
    vec![
        attach(1, 8, 0),
        attach(1, 9, 0),
        attach(2, 16, 0),
        attach(3, 24, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        map(1, 0x1000, 4, 0x10_0000),
        map(1, 0x10_0000, 1, 0x20_0000),
        map(2, 0x1000, 16, 0x30_0000),
        unmap(1, 0x1000, 4),
        map(1, 0x2000, 2, 0x40_0000),
        Request::Detach(Detach {
            domain: 2,
            endpoint: 16,
        }),
        attach(4, 16, 0),
        map(4, 0x8000, 1, 0x50_0000),
    ]
}

fn driven() -> Device {
    let mut d = Device::new(cfg()).expect("valid config");
    let f = Features(features(&d));
    d.set_features(f, &mut NullSink).expect("offered");
    d.write_config(0x24, &[0], &mut NullSink)
        .expect("bypass off");
    for r in history() {
        assert_eq!(d.handle(&r, &mut NullSink), Status::Ok, "{r:?}");
    }
    d
}

fn positions(r: &Restored) -> Vec<u16> {
    r.applied.iter().map(|a| a.position).collect()
}

/// Everything a driver or backend can observe of the device's state.
fn observe(d: &Device) -> Vec<String> {
    let mut out = vec![
        format!("features {:#x}", d.negotiated_features().0),
        format!("config {:?}", d.config_space()),
        format!(
            "domains {} mappings {}",
            d.domain_count(),
            d.mapping_count()
        ),
    ];
    for ep in [0u32, 8, 9, 16, 24, 25, 0xffff] {
        out.push(format!("ep {ep} {:?}", d.endpoint_state(ep)));
    }
    for dom in 0..6u32 {
        if let Some(ms) = d.mappings(dom) {
            out.push(format!("dom {dom} {:?}", ms.collect::<Vec<_>>()));
        }
    }
    out
}

#[test]
fn a_snapshot_restores_the_same_observable_state() {
    let d = driven();
    let bytes = snapshot(&d, &[], Kind::Snapshot);
    let r = restore(cfg(), &bytes).expect("a fresh snapshot loads");
    assert_eq!(observe(&r.device), observe(&d));
    assert!(!r.torn_tail);
    assert_eq!(r.valid_len, bytes.len());
    assert!(r.applied.is_empty());
    // Saving the restored device gives the same bytes: nothing was lost
    // or reordered on the way.
    assert_eq!(snapshot(&r.device, &[], Kind::Snapshot), bytes);
}

#[test]
fn a_snapshot_of_a_fresh_device_restores_a_fresh_device() {
    let d = Device::new(cfg()).expect("valid config");
    let r = restore(cfg(), &snapshot(&d, &[], Kind::Snapshot)).expect("loads");
    assert_eq!(observe(&r.device), observe(&d));
}

/// A journal as the daemon writes it: a snapshot of the device it started
/// with, then one record per change.
struct Journal {
    bytes: Vec<u8>,
    index: u64,
    fp: u64,
}

impl Journal {
    fn start(d: &Device) -> Self {
        let bytes = snapshot(d, &[], Kind::Journal);
        let r = restore(d.config().clone(), &bytes).expect("the start loads");
        // journal_start says how many records it wrote without a replay.
        assert_eq!(journal_start(d), (bytes.clone(), r.records));
        Journal {
            bytes,
            index: r.records,
            fp: fingerprint(d.config()),
        }
    }

    fn push(&mut self, r: &Record<'_>) {
        let mut buf = [0u8; MAX_RECORD_LEN];
        let n = encode_record(self.index, self.fp, r, &mut buf);
        self.bytes.extend_from_slice(&buf[..n]);
        self.index += 1;
    }
}

#[test]
fn a_journal_replays_features_config_writes_requests_and_resets() {
    let mut d = Device::new(cfg()).expect("valid config");
    let mut j = Journal::start(&d);
    let f = features(&d);
    d.set_features(Features(f), &mut NullSink).expect("offered");
    j.push(&Record::Features(f));
    d.write_config(0x24, &[0], &mut NullSink)
        .expect("bypass off");
    j.push(&Record::Config {
        offset: 0x24,
        value: 0,
    });
    for (i, r) in history().iter().enumerate() {
        assert_eq!(d.handle(r, &mut NullSink), Status::Ok);
        j.push(&Record::Request {
            position: Some((i as u16).wrapping_add(65530)),
            bytes: &r.encode(),
        });
    }
    let r = restore(cfg(), &j.bytes).expect("the journal loads");
    assert_eq!(observe(&r.device), observe(&d));
    assert_eq!(r.valid_len, j.bytes.len());
    let expected: Vec<u16> = (0..history().len())
        .map(|i| (i as u16).wrapping_add(65530))
        .collect();
    assert_eq!(positions(&r), expected, "positions wrap as the ring's do");
    assert_eq!(r.applied[0].request.bytes(), history()[0].encode());

    // A reset forgets the positions before it, and the state.
    d.reset(&mut NullSink);
    j.push(&Record::Reset);
    let r = restore(cfg(), &j.bytes).expect("loads");
    assert_eq!(observe(&r.device), observe(&d));
    assert!(r.applied.is_empty());
    d.system_reset(&mut NullSink);
    j.push(&Record::SystemReset);
    assert_eq!(
        observe(&restore(cfg(), &j.bytes).expect("loads").device),
        observe(&d)
    );
}

#[test]
fn a_journal_with_trailing_zeros_ends_at_its_last_record() {
    let d = driven();
    let mut j = Journal::start(&d);
    j.push(&Record::Request {
        position: Some(7),
        bytes: &map(1, 0x7000, 1, 0x9000).encode(),
    });
    let written = j.bytes.len();
    j.bytes.resize(written + 4096, 0);
    let r = restore(cfg(), &j.bytes).expect("loads");
    assert_eq!(r.valid_len, written);
    assert!(!r.torn_tail);
    assert_eq!(positions(&r), vec![7]);
}

#[test]
fn a_torn_last_append_is_dropped_and_everything_before_it_kept() {
    let d = driven();
    let mut j = Journal::start(&d);
    j.push(&Record::Request {
        position: Some(1),
        bytes: &map(1, 0x7000, 1, 0x9000).encode(),
    });
    let whole = j.bytes.len();
    j.push(&Record::Request {
        position: Some(2),
        bytes: &map(1, 0x8000, 1, 0xa000).encode(),
    });
    // The process died halfway through the second append: the file holds
    // its first bytes and zeros after.
    let torn = whole + 20;
    j.bytes.truncate(torn);
    j.bytes.resize(torn + 8192, 0);
    let r = restore(cfg(), &j.bytes).expect("a torn tail is not corruption");
    assert!(r.torn_tail);
    assert_eq!(r.valid_len, whole);
    assert_eq!(positions(&r), vec![1]);
    assert_eq!(
        r.device.mapping_count(),
        d.mapping_count() + 1,
        "the whole record applied, the torn one did not"
    );
}

#[test]
fn a_corrupt_record_followed_by_more_is_refused() {
    let d = driven();
    let mut j = Journal::start(&d);
    let at = j.bytes.len();
    for i in 0..40u64 {
        j.push(&Record::Request {
            position: Some(i as u16),
            bytes: &map(1, 0x10_0000_0000 + i * 0x1000, 1, 0x9000).encode(),
        });
    }
    j.bytes[at + 20] ^= 0x40;
    match restore(cfg(), &j.bytes) {
        Err(StateError::Corrupt { why, .. }) => assert_eq!(why, "checksum mismatch"),
        other => panic!("expected a corrupt record, got {other:?}"),
    }
}

#[test]
fn a_truncated_snapshot_is_refused() {
    let d = driven();
    let bytes = snapshot(&d, &[], Kind::Snapshot);
    // Cut at every record boundary and inside records: never loads.
    for cut in (0..bytes.len()).step_by(7) {
        let r = restore(cfg(), &bytes[..cut]);
        assert!(
            r.is_err(),
            "a snapshot cut at {cut} of {} loaded",
            bytes.len()
        );
    }
    assert_eq!(
        restore(cfg(), &bytes[..10]).err(),
        Some(StateError::Truncated(10))
    );
    let without_end = bytes.len() - 24;
    assert!(matches!(
        restore(cfg(), &bytes[..without_end]),
        Err(StateError::MissingEnd { .. })
    ));
}

#[test]
fn any_flipped_bit_of_a_snapshot_is_refused() {
    let d = driven();
    let bytes = snapshot(&d, &[], Kind::Snapshot);
    for i in 0..bytes.len() {
        for bit in [0u8, 3, 7] {
            let mut t = bytes.clone();
            t[i] ^= 1 << bit;
            assert!(
                restore(cfg(), &t).is_err(),
                "flipping bit {bit} of byte {i} went unnoticed"
            );
        }
    }
}

#[test]
fn reordered_records_are_refused() {
    let d = driven();
    let bytes = snapshot(&d, &[], Kind::Snapshot);
    // Records of the same request kind have the same length: swap the
    // second and third ATTACH records.
    let len = {
        let mut buf = [0u8; MAX_RECORD_LEN];
        encode_record(
            0,
            0,
            &Record::Request {
                position: None,
                bytes: &attach(1, 1, 0).encode(),
            },
            &mut buf,
        )
    };
    let base_len = {
        let mut buf = [0u8; MAX_RECORD_LEN];
        encode_record(
            0,
            0,
            &Record::Base {
                negotiated: 0,
                bypass: 0,
            },
            &mut buf,
        )
    };
    let a = HEADER_LEN + base_len;
    let mut t = bytes.clone();
    let (x, y) = (t[a..a + len].to_vec(), t[a + len..a + 2 * len].to_vec());
    t[a..a + len].copy_from_slice(&y);
    t[a + len..a + 2 * len].copy_from_slice(&x);
    assert_ne!(t, bytes);
    assert!(matches!(
        restore(cfg(), &t),
        Err(StateError::Corrupt { .. })
    ));
}

#[test]
fn a_state_of_a_differently_configured_device_is_refused() {
    let d = driven();
    let bytes = snapshot(&d, &[], Kind::Snapshot);
    let mut other = cfg();
    other.limits.max_mappings -= 1;
    assert!(matches!(
        restore(other, &bytes),
        Err(StateError::Foreign { .. })
    ));
    let mut other = cfg();
    other.endpoints[0].last = 0xfff;
    assert!(matches!(
        restore(other, &bytes),
        Err(StateError::Foreign { .. })
    ));
}

#[test]
fn other_versions_kinds_and_magics_are_refused() {
    let bytes = snapshot(&driven(), &[], Kind::Snapshot);
    let mut t = bytes.clone();
    t[8] = 2;
    assert_eq!(
        restore(cfg(), &t).err(),
        Some(StateError::Version { found: 2 })
    );
    let mut t = bytes.clone();
    t[12] = 9;
    assert_eq!(restore(cfg(), &t).err(), Some(StateError::Kind(9)));
    let mut t = bytes.clone();
    t[0] = b'X';
    assert_eq!(restore(cfg(), &t).err(), Some(StateError::Magic));
    let mut t = bytes;
    t[17] ^= 1;
    assert_eq!(restore(cfg(), &t).err(), Some(StateError::HeaderChecksum));
}

#[test]
fn a_well_formed_record_the_model_refuses_is_refused() {
    let d = driven();
    let mut j = Journal::start(&d);
    // Overlaps a mapping of domain 1: never answered OK, so never saved.
    j.push(&Record::Request {
        position: None,
        bytes: &map(1, 0x2000, 1, 0x9000).encode(),
    });
    assert!(matches!(
        restore(cfg(), &j.bytes),
        Err(StateError::Inapplicable { .. })
    ));
    let mut j = Journal::start(&d);
    j.push(&Record::Request {
        position: None,
        bytes: &[0xff; 8],
    });
    assert!(matches!(
        restore(cfg(), &j.bytes),
        Err(StateError::Inapplicable { .. })
    ));
    let mut j = Journal::start(&Device::new(cfg()).expect("valid"));
    j.push(&Record::Features(1 << 63));
    assert!(matches!(
        restore(cfg(), &j.bytes),
        Err(StateError::Inapplicable { .. })
    ));
}

#[test]
fn a_base_record_with_unoffered_features_or_a_bad_bypass_is_refused() {
    let fp = fingerprint(&cfg());
    for base in [
        Record::Base {
            negotiated: 1 << 63,
            bypass: 0,
        },
        Record::Base {
            negotiated: 0,
            bypass: 2,
        },
    ] {
        let mut bytes = header(Kind::Snapshot, fp).to_vec();
        let mut buf = [0u8; MAX_RECORD_LEN];
        let n = encode_record(0, fp, &base, &mut buf);
        bytes.extend_from_slice(&buf[..n]);
        let n = encode_record(1, fp, &Record::End { records: 1 }, &mut buf);
        bytes.extend_from_slice(&buf[..n]);
        assert!(matches!(
            restore(cfg(), &bytes),
            Err(StateError::Inapplicable { .. })
        ));
    }
}

#[test]
fn undelivered_faults_travel_with_a_snapshot_and_go_with_a_reset() {
    use virtio_iommu_proto::{FaultFlags, FaultReason};
    let d = driven();
    let faults = [
        FaultRecord {
            reason: FaultReason::Mapping,
            access: FaultFlags::READ,
            endpoint: 8,
            address: Some(0x5000),
        },
        FaultRecord {
            reason: FaultReason::Domain,
            access: FaultFlags::WRITE,
            endpoint: 9,
            address: None,
        },
    ];
    let bytes = snapshot(&d, &faults, Kind::Snapshot);
    let r = restore(cfg(), &bytes).expect("loads");
    assert_eq!(r.faults, faults);
    assert_eq!(observe(&r.device), observe(&d));
    let mut j = Journal {
        bytes: snapshot(&d, &faults, Kind::Journal),
        index: 0,
        fp: fingerprint(&cfg()),
    };
    j.index = restore(cfg(), &j.bytes).expect("loads").records;
    j.push(&Record::Reset);
    assert!(restore(cfg(), &j.bytes).expect("loads").faults.is_empty());
}
