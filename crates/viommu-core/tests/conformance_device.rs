//! Device-wide requirements: features, config space, reset, framing,
//! bypass, PROBE and RESV_MEM, fault records.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use viommu_core::{Access, Change, ChangeLog, Device, EndpointState, TranslateError};
use virtio_iommu_proto::config::BYPASS_OFFSET;
use virtio_iommu_proto::features::*;
use virtio_iommu_proto::probe::{Property, ResvSubtype, parse_properties};
use virtio_iommu_proto::{FaultFlags, FaultReason, FaultRecord, Features, Probe, Request, Status};

fn fault_of(h: &Harness, ep: u32, iova: u64, access: Access) -> FaultRecord {
    match h.xlate(ep, iova, access) {
        Err(TranslateError::Fault(f)) => f,
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn dev_feat_1_2_3_offered_features() {
    let dev = Device::new(test_config()).unwrap();
    let f = dev.offered_features();
    assert!(f.has(VIRTIO_IOMMU_F_MAP_UNMAP), "DEV-FEAT-1");
    assert!(f.has(VIRTIO_F_VERSION_1));
    assert!(!f.has(VIRTIO_IOMMU_F_BYPASS), "DEV-FEAT-2");
    assert_eq!(f.0 >> 7 & ((1 << 25) - 1), 0, "no bit 7..31 is offered");
    // The legacy switch replaces BYPASS_CONFIG, never joins it (DEV-FEAT-3).
    let mut cfg = test_config();
    cfg.bypass_config = false;
    cfg.legacy_bypass = true;
    let f = Device::new(cfg.clone()).unwrap().offered_features();
    assert!(f.has(VIRTIO_IOMMU_F_BYPASS) && !f.has(VIRTIO_IOMMU_F_BYPASS_CONFIG));
    cfg.bypass_config = true;
    assert!(Device::new(cfg).is_err());
}

#[test]
fn dev_gen_4_any_offered_subset_is_accepted_and_unoffered_bits_refused() {
    let mut dev = Device::new(test_config()).unwrap();
    let offered = dev.offered_features();
    let mut log = ChangeLog::default();
    // Every subset of the IOMMU bits 0..=6 combined with VERSION_1.
    for bits in 0u64..128 {
        let f = Features((bits & offered.0) | (1 << VIRTIO_F_VERSION_1));
        dev.set_features(f, &mut log).unwrap();
        assert_eq!(dev.negotiated_features(), f);
    }
    let err = dev
        .set_features(Features(1 << VIRTIO_IOMMU_F_BYPASS), &mut log)
        .unwrap_err();
    assert_eq!(err.unoffered, 1 << VIRTIO_IOMMU_F_BYPASS);
}

#[test]
fn dev_cfg_1_7_8_config_is_complete_before_features_are_negotiated() {
    let dev = Device::new(test_config()).unwrap();
    assert_eq!(dev.negotiated_features(), Features::EMPTY);
    let bytes = dev.config_space().to_bytes();
    assert_ne!(
        u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
        0,
        "DEV-CFG-1"
    );
    assert_eq!(
        u64::from_le_bytes(bytes[0x10..0x18].try_into().unwrap()),
        (1 << 48) - 1
    );
    assert_eq!(
        u32::from_le_bytes(bytes[0x1c..0x20].try_into().unwrap()),
        1023
    );
    assert_eq!(
        u32::from_le_bytes(bytes[0x20..0x24].try_into().unwrap()),
        PROBE_SIZE as u32
    );
    assert_eq!(bytes[0x24], 0);
}

#[test]
fn dev_cfg_3_dev_ops_8_boot_bypass_applies_before_and_without_negotiation() {
    let mut cfg = test_config();
    cfg.initial_bypass = true;
    let mut dev = Device::new(cfg).unwrap();
    assert_eq!(dev.config_space().bypass, 1, "DEV-CFG-3");
    assert_eq!(dev.translate(3, 0x1234, Access::Write).unwrap().gpa, 0x1234);
    // Driver acks without BYPASS_CONFIG: still bypass, because it was offered.
    let acked = dev
        .offered_features()
        .with(VIRTIO_IOMMU_F_BYPASS_CONFIG, false);
    dev.set_features(acked, &mut ChangeLog::default()).unwrap();
    assert_eq!(dev.translate(3, 0x1234, Access::Read).unwrap().gpa, 0x1234);
}

#[test]
fn dev_cfg_4_5_bypass_survives_device_reset_and_returns_on_system_reset() {
    let mut cfg = test_config();
    cfg.initial_bypass = true;
    let mut h = harness_with(cfg, None);
    h.dev.write_config(BYPASS_OFFSET, &[0], &mut h.log).unwrap();
    h.dev.reset(&mut h.log);
    assert_eq!(h.dev.config_space().bypass, 0, "DEV-CFG-4");
    h.dev.system_reset(&mut h.log);
    assert_eq!(h.dev.config_space().bypass, 1, "DEV-CFG-5");
    assert_eq!(h.dev.endpoint_state(0), Some(EndpointState::Bypass));
}

#[test]
fn dev_cfg_6_drv_cfg_1_2_bad_config_writes_change_nothing() {
    let mut h = harness();
    let before = h.dev.config_space();
    for v in [2u8, 0xff] {
        assert!(h.dev.write_config(BYPASS_OFFSET, &[v], &mut h.log).is_err());
    }
    assert!(h.dev.write_config(0, &[1], &mut h.log).is_err());
    assert!(
        h.dev
            .write_config(BYPASS_OFFSET, &[1, 0, 0, 0], &mut h.log)
            .is_err()
    );
    assert!(h.dev.write_config(0x25, &[1], &mut h.log).is_err());
    assert_eq!(h.dev.config_space(), before);
    assert!(h.dev.config_space().bypass <= 1);
    assert!(h.log.changes.is_empty());
    // Without BYPASS_CONFIG negotiated the byte is read-only.
    let cfg = test_config();
    let acked = Device::new(cfg.clone())
        .unwrap()
        .offered_features()
        .with(VIRTIO_IOMMU_F_BYPASS_CONFIG, false);
    let mut h = harness_with(cfg, Some(acked));
    assert!(h.dev.write_config(BYPASS_OFFSET, &[1], &mut h.log).is_err());
    assert_eq!(h.dev.config_space().bypass, 0);
}

#[test]
fn dev_init_1_dev_gen_5_reset_drops_domains_and_mappings() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    h.log.take();
    h.dev.reset(&mut h.log);
    assert_eq!(
        h.log.take(),
        vec![
            Change::Endpoint {
                endpoint: 0,
                from: EndpointState::Domain(1),
                to: EndpointState::Blocked
            },
            Change::DomainDestroyed { domain: 1 }
        ]
    );
    assert_eq!(h.dev.negotiated_features(), Features::EMPTY);
    h.dev
        .set_features(h.dev.offered_features(), &mut h.log)
        .unwrap();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::NoEnt);
    assert_eq!(h.gpa(0, 0x1000, Access::Read), None);
    assert_eq!((h.dev.domain_count(), h.dev.mapping_count()), (0, 0));
}

#[test]
fn dev_ops_1_4_successful_requests_say_ok_with_clean_tails() {
    // `send` checks used length and tail bytes for every request.
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    assert_eq!(h.unmap(1, 0x1000, 0x1fff), Status::Ok);
    assert_eq!(h.detach(1, 0), Status::Ok);
    assert_eq!(h.probe(0).0, Status::Ok);
}

#[test]
fn dev_ops_2_unknown_types_write_nothing() {
    let mut h = harness();
    for t in [0u8, 6, 7, 0x80, 0xff] {
        let mut req = vec![0u8; 72];
        req[0] = t;
        let out = h.raw(&req, 4);
        assert_eq!(out.used_len, 0);
        assert_eq!(out.writable, vec![0xaa; 4]);
    }
    assert!(h.log.changes.is_empty());
}

#[test]
fn dev_ops_3_head_reserved_is_ignored() {
    let mut h = harness();
    let mut attach = Request::Attach(virtio_iommu_proto::Attach {
        domain: 1,
        endpoint: 0,
        flags: 0,
        reserved: [0; 4],
    })
    .encode();
    attach[1..4].copy_from_slice(&[0xff; 3]);
    assert_eq!(h.raw(&attach, 4).status_at(0), Some(Status::Ok));
    let mut map = Request::Map(virtio_iommu_proto::Map {
        domain: 1,
        virt_start: 0x1000,
        virt_end: 0x1fff,
        phys_start: 0,
        flags: RW,
    })
    .encode();
    map[1..4].copy_from_slice(&[0xff; 3]);
    assert_eq!(h.raw(&map, 4).status_at(0), Some(Status::Ok));
}

#[test]
fn dev_ops_6_unparseable_chains_are_returned_untouched() {
    let mut h = harness();
    h.attach(1, 0);
    h.log.take();
    let map = Request::Map(virtio_iommu_proto::Map {
        domain: 1,
        virt_start: 0x1000,
        virt_end: 0x1fff,
        phys_start: 0,
        flags: RW,
    })
    .encode();
    for writable_len in 0..4 {
        let out = h.raw(&map, writable_len);
        assert_eq!(out.used_len, 0);
        assert!(out.writable.iter().all(|&b| b == 0xaa));
    }
    for readable_len in 0..4 {
        let out = h.raw(&map[..readable_len], 4);
        assert_eq!((out.used_len, out.writable.as_slice()), (0, &[0xaa; 4][..]));
    }
    assert!(h.log.changes.is_empty(), "no state change");
    assert_eq!(h.dev.mapping_count(), 0);
}

#[test]
fn amb_9_short_readable_part_is_inval_and_extra_bytes_are_ignored() {
    let mut h = harness();
    h.attach(1, 0);
    let map = Request::Map(virtio_iommu_proto::Map {
        domain: 1,
        virt_start: 0x1000,
        virt_end: 0x1fff,
        phys_start: 0,
        flags: RW,
    })
    .encode();
    for len in 4..map.len() {
        let out = h.raw(&map[..len], 4);
        assert_eq!((out.used_len, out.status_at(0)), (4, Some(Status::Inval)));
    }
    assert_eq!(h.dev.mapping_count(), 0);
    let mut long = map.clone();
    long.extend_from_slice(&[0x55; 100]);
    assert_eq!(
        h.raw(&long, 64).status_at(0),
        Some(Status::Ok),
        "AMB-2: tail at offset 0"
    );
}

#[test]
fn dev_ops_5_unattached_endpoints_without_bypass_are_blocked() {
    let h = harness();
    let f = fault_of(&h, 0, 0x1000, Access::Read);
    assert_eq!(f.reason, FaultReason::Domain);
    assert_eq!(
        (f.endpoint, f.address, f.access),
        (0, Some(0x1000), FaultFlags::READ)
    );
}

#[test]
fn dev_ops_7_bypass_allows_every_access_by_identity() {
    let mut h = harness();
    h.dev.write_config(BYPASS_OFFSET, &[1], &mut h.log).unwrap();
    for access in [Access::Read, Access::Write, Access::ReadWrite] {
        let t = h.xlate(5, 0xdead_b000, access).unwrap();
        assert_eq!((t.gpa, t.iova_last), (0xdead_b000, u64::MAX));
    }
}

#[test]
fn dev_ops_9_legacy_bypass_only_when_negotiated() {
    let mut cfg = test_config();
    cfg.bypass_config = false;
    cfg.legacy_bypass = true;
    let offered = Device::new(cfg.clone()).unwrap().offered_features();
    let h = harness_with(cfg.clone(), Some(offered));
    assert_eq!(h.gpa(1, 0x5000, Access::Write), Some(0x5000));
    let h = harness_with(cfg, Some(offered.with(VIRTIO_IOMMU_F_BYPASS, false)));
    assert_eq!(h.gpa(1, 0x5000, Access::Write), None);
}

#[test]
fn dev_ops_10_bypass_write_changes_unattached_endpoints_only() {
    let mut h = harness();
    h.dev.write_config(BYPASS_OFFSET, &[1], &mut h.log).unwrap();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    h.log.take();
    h.dev.write_config(BYPASS_OFFSET, &[0], &mut h.log).unwrap();
    assert_eq!(
        h.gpa(1, 0x1000, Access::Read),
        None,
        "unattached now blocked"
    );
    assert_eq!(
        h.gpa(0, 0x1000, Access::Read),
        Some(0x5000),
        "attached unaffected"
    );
    let changes = h.log.take();
    // Endpoints 1..=9 and 100 are unattached: 10 changes, all narrowing.
    assert_eq!(changes.len(), 10);
    assert!(changes.iter().all(|c| matches!(c, Change::Endpoint { from: EndpointState::Bypass, to: EndpointState::Blocked, endpoint } if *endpoint != 0)));
    assert!(changes.iter().all(Change::requires_grace_period));
}

#[test]
fn dev_probe_1_reserved_bytes_are_ignored() {
    let mut h = harness();
    let mut req = Request::Probe(Probe { endpoint: 8 }).encode();
    let clean = h.raw(&req, PROBE_SIZE + 4).writable;
    req[8..72].copy_from_slice(&[0xff; 64]);
    req[1..4].copy_from_slice(&[0xff; 3]);
    assert_eq!(h.raw(&req, PROBE_SIZE + 4).writable, clean);
}

#[test]
fn dev_probe_2_unknown_endpoint_is_noent_at_offset_probe_size() {
    let mut h = harness();
    let (status, area) = h.probe(UNKNOWN_EP);
    assert_eq!(status, Status::NoEnt);
    assert!(area.iter().all(|&b| b == 0));
}

#[test]
fn dev_probe_3_without_f_probe_probe_is_unparsed() {
    let mut cfg = test_config();
    cfg.probe_size = None;
    let mut h = harness_with(cfg, None);
    assert_eq!(h.dev.config_space().probe_size, 0);
    let out = h.raw(
        &Request::Probe(Probe { endpoint: 0 }).encode(),
        PROBE_SIZE + 4,
    );
    assert_eq!(out.used_len, 0);
    assert!(out.writable.iter().all(|&b| b == 0xaa));
}

#[test]
fn dev_probe_4_5_6_8_9_property_layout_and_zero_fill() {
    let mut h = harness();
    let (status, area) = h.probe(8);
    assert_eq!(status, Status::Ok);
    // Two RESV_MEM properties at offsets 0 and 24, each type 1 with clean
    // reserved bits and length 20; zeros after them.
    for off in [0usize, 24] {
        let word0 = u16::from_le_bytes([area[off], area[off + 1]]);
        assert_eq!(word0 >> 12, 0, "DEV-PROBE-4");
        assert_eq!(word0 & 0xfff, 1);
        assert_eq!(
            u16::from_le_bytes([area[off + 2], area[off + 3]]),
            20,
            "DEV-PROBE-5"
        );
    }
    assert!(area[48..].iter().all(|&b| b == 0), "DEV-PROBE-8");
    // The spec's walk finds exactly the configured regions (DEV-PROBE-6, -9).
    let props = parse_properties(&area);
    assert_eq!(
        props,
        vec![Property::ResvMem(RESERVED), Property::ResvMem(MSI_ARM)]
    );
    // An endpoint with no regions gets an all-zero area.
    let (status, area) = h.probe(100);
    assert_eq!(status, Status::Ok);
    assert!(area.iter().all(|&b| b == 0));
}

#[test]
fn dev_probe_7_short_properties_area_is_inval_with_no_property() {
    let mut h = harness();
    let req = Request::Probe(Probe { endpoint: 0 }).encode();
    for writable_len in [4, 8, PROBE_SIZE - 8 + 4, PROBE_SIZE + 3] {
        let out = h.raw(&req, writable_len);
        assert_eq!(
            out.used_len as usize, writable_len,
            "AMB-3: the whole part is written"
        );
        assert_eq!(out.status_at(writable_len - 4), Some(Status::Inval));
        assert!(
            out.writable[..writable_len - 4].iter().all(|&b| b == 0),
            "no property"
        );
        assert!(parse_properties(&out.writable[..writable_len - 4]).is_empty());
    }
    // A larger part than needed: tail at probe_size (AMB-2).
    let out = h.raw(&req, PROBE_SIZE + 64);
    assert_eq!(out.used_len as usize, PROBE_SIZE + 4);
    assert_eq!(out.status_at(PROBE_SIZE), Some(Status::Ok));
    assert!(out.writable[PROBE_SIZE + 4..].iter().all(|&b| b == 0xaa));
}

#[test]
fn dev_probe_10_probe_is_stateless_and_independent_of_attachment() {
    let mut h = harness();
    let before = h.probe(0);
    h.log.take();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.probe(0), before);
    let changes_after_attach = h.log.changes.len();
    h.probe(0);
    assert_eq!(
        h.log.changes.len(),
        changes_after_attach,
        "PROBE changes nothing"
    );
}

#[test]
fn dev_resv_1_2_3_6_regions_are_clean_single_msi_and_disjoint() {
    let mut h = harness();
    for ep in [0u32, 8, 100] {
        let (_, area) = h.probe(ep);
        let mut regions = vec![];
        for p in parse_properties(&area) {
            let Property::ResvMem(r) = p else {
                panic!("only RESV_MEM is advertised")
            };
            regions.push(r);
        }
        for off in (0..regions.len() * 24).step_by(24) {
            assert_eq!(&area[off + 5..off + 8], &[0, 0, 0], "DEV-RESV-1");
            assert!(area[off + 4] <= 1, "DEV-RESV-6 subtype");
        }
        assert!(
            regions
                .iter()
                .filter(|r| r.subtype == ResvSubtype::Msi)
                .count()
                <= 1,
            "DEV-RESV-2"
        );
        for (i, a) in regions.iter().enumerate() {
            assert!(a.start <= a.end);
            for b in &regions[..i] {
                assert!(!a.overlaps(b.start, b.end), "DEV-RESV-3");
            }
        }
    }
}

#[test]
fn dev_fault_1_2_3_4_6_fault_records() {
    let mut h = harness();
    // Unattached, not bypassed: DOMAIN.
    let f = fault_of(&h, 2, 0x7000, Access::Write);
    assert_eq!((f.reason, f.endpoint), (FaultReason::Domain, 2));
    // Attached, unmapped: MAPPING.
    assert_eq!(h.attach(1, 2), Status::Ok);
    let f = fault_of(&h, 2, 0x7000, Access::Read);
    assert_eq!(
        (f.reason, f.access),
        (FaultReason::Mapping, FaultFlags::READ)
    );
    // Read of a write-only mapping: MAPPING with READ.
    assert_eq!(h.map(1, 0x7000, 0x7fff, 0, W), Status::Ok);
    let f = fault_of(&h, 2, 0x7010, Access::Read);
    assert_eq!(
        (f.reason, f.access, f.address),
        (FaultReason::Mapping, FaultFlags::READ, Some(0x7010))
    );
    // The encoded record: reserved bytes zero, only defined flags, address flag.
    let bytes = f.to_bytes();
    assert_eq!(&bytes[1..4], &[0, 0, 0]);
    assert_eq!(&bytes[12..16], &[0, 0, 0, 0]);
    let flags = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    assert_eq!(flags & !0x103, 0);
    assert_eq!(flags, 0x101);
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
    assert_eq!(
        u64::from_le_bytes(bytes[16..24].try_into().unwrap()),
        0x7010
    );
    // An unknown endpoint gives no fault record at all.
    assert_eq!(
        h.xlate(UNKNOWN_EP, 0, Access::Read),
        Err(TranslateError::UnknownEndpoint(UNKNOWN_EP))
    );
}

#[test]
fn publish_state_replays_everything_from_an_empty_table() {
    let mut h = harness();
    h.dev.write_config(BYPASS_OFFSET, &[1], &mut h.log).unwrap();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    assert_eq!(h.attach_bypass(2, 1), Status::Ok);
    let mut replay = ChangeLog::default();
    h.dev.publish_state(&mut replay);
    assert_eq!(replay.changes[0], Change::DomainCreated { domain: 1 });
    assert!(matches!(
        replay.changes[1],
        Change::MappingAdded { domain: 1, .. }
    ));
    // Every endpoint appears once, with its current state.
    let eps: Vec<_> = replay
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Endpoint { endpoint, from, to } => {
                assert_eq!(*from, EndpointState::Blocked);
                Some((*endpoint, *to))
            }
            _ => None,
        })
        .collect();
    assert_eq!(eps.len(), 11);
    assert!(eps.contains(&(0, EndpointState::Domain(1))));
    assert!(eps.contains(&(1, EndpointState::Bypass)));
    assert!(eps.contains(&(100, EndpointState::Bypass)));
}

#[test]
fn dev_gen_2_used_len_is_exact_and_never_exceeds_the_writable_part() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    let requests = [
        Request::Attach(virtio_iommu_proto::Attach {
            domain: 2,
            endpoint: 1,
            flags: 0,
            reserved: [0; 4],
        }),
        Request::Detach(virtio_iommu_proto::Detach {
            domain: 9,
            endpoint: 1,
        }),
        Request::Map(virtio_iommu_proto::Map {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0,
            flags: RW,
        }),
        Request::Unmap(virtio_iommu_proto::Unmap {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            reserved: [0; 4],
        }),
        Request::Probe(Probe { endpoint: 8 }),
    ];
    for req in requests {
        let bytes = req.encode();
        for writable_len in 0..PROBE_SIZE + 40 {
            let reply = h.dev.process(&bytes, writable_len, &mut h.log);
            let used = reply.used_len() as usize;
            assert!(
                used <= writable_len,
                "{req:?} writable {writable_len} used {used}"
            );
            let want = match (writable_len, req) {
                (0..4, _) => 0,
                (_, Request::Probe(_)) => writable_len.min(PROBE_SIZE + 4),
                _ => 4,
            };
            assert_eq!(used, want, "{req:?} writable {writable_len}");
        }
    }
}
