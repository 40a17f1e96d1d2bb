//! DEV-ATT-* and DEV-DET-*: attaching and detaching endpoints.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use viommu_core::{Access, Change, EndpointState};
use virtio_iommu_proto::{Attach, FaultReason, Request, Status};

fn attach_raw(
    h: &mut Harness,
    domain: u32,
    endpoint: u32,
    flags: u32,
    reserved: [u8; 4],
) -> Status {
    h.send(Request::Attach(Attach {
        domain,
        endpoint,
        flags,
        reserved,
    }))
}

#[test]
fn dev_att_1_reserved_nonzero_is_inval_and_leaves_endpoint_alone() {
    let mut h = harness();
    for reserved in [[0, 0, 0, 1], [1, 0, 0, 0], [0xff; 4]] {
        assert_eq!(attach_raw(&mut h, 1, 0, 0, reserved), Status::Inval);
    }
    assert_eq!(h.dev.endpoint_state(0), Some(EndpointState::Blocked));
    assert_eq!(h.dev.domain_count(), 0);
    // And a valid attach moved away from is not undone by a bad one.
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(attach_raw(&mut h, 2, 0, 0, [0, 0, 1, 0]), Status::Inval);
    assert_eq!(h.dev.endpoint_state(0), Some(EndpointState::Domain(1)));
}

#[test]
fn dev_att_2_unknown_flags_are_inval_and_create_no_domain() {
    let mut h = harness();
    for flags in [0x2, 0x8000_0000, 0x3] {
        assert_eq!(attach_raw(&mut h, 1, 0, flags, [0; 4]), Status::Inval);
    }
    assert_eq!(h.dev.domain_count(), 0);
    assert_eq!(h.map(1, 0, 0xfff, 0, RW), Status::NoEnt);
}

#[test]
fn dev_att_3_unknown_endpoint_is_noent_and_creates_no_domain() {
    let mut h = harness();
    assert_eq!(h.attach(1, UNKNOWN_EP), Status::NoEnt);
    assert_eq!(h.attach(1, 10), Status::NoEnt);
    assert_eq!(h.dev.domain_count(), 0);
    assert!(h.log.changes.is_empty());
}

#[test]
fn dev_att_4_second_endpoint_shares_the_domain_and_its_mappings() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.attach(1, 1), Status::Ok);
    assert_eq!(h.map(1, 0x10000, 0x1ffff, 0x80000, RW), Status::Ok);
    assert_eq!(h.gpa(0, 0x10010, Access::Read), Some(0x80010));
    assert_eq!(h.gpa(1, 0x10010, Access::Write), Some(0x80010));
}

#[test]
fn dev_att_5_bypass_flag_must_match_the_existing_domain() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.attach_bypass(1, 1), Status::Inval);
    assert_eq!(h.dev.endpoint_state(1), Some(EndpointState::Blocked));
    assert_eq!(h.attach_bypass(2, 2), Status::Ok);
    assert_eq!(h.attach(2, 3), Status::Inval);
    assert_eq!(h.dev.endpoint_state(3), Some(EndpointState::Blocked));
    // The same check applies to an endpoint already in the domain.
    assert_eq!(h.attach_bypass(1, 0), Status::Inval);
    assert_eq!(h.dev.endpoint_state(0), Some(EndpointState::Domain(1)));
}

#[test]
fn dev_att_6_reattach_moves_the_endpoint_and_destroys_the_empty_old_domain() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    h.log.take();
    assert_eq!(h.attach(2, 0), Status::Ok);
    assert!(h.xlate(0, 0x1000, Access::Read).is_err());
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::NoEnt);
    // The move is announced before the old domain goes, and needs a grace period.
    let changes = h.log.take();
    assert_eq!(
        changes,
        vec![
            Change::DomainCreated { domain: 2 },
            Change::Endpoint {
                endpoint: 0,
                from: EndpointState::Domain(1),
                to: EndpointState::Domain(2)
            },
            Change::DomainDestroyed { domain: 1 },
        ]
    );
    assert!(changes[1].requires_grace_period());
}

#[test]
fn dev_att_6_reattach_keeps_a_shared_old_domain() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.attach(1, 1), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    assert_eq!(h.attach(2, 0), Status::Ok);
    assert_eq!(h.gpa(1, 0x1000, Access::Read), Some(0x5000));
    assert_eq!(h.gpa(0, 0x1000, Access::Read), None);
}

#[test]
fn dev_att_7_endpoint_whose_reserved_region_is_mapped_in_the_domain_is_unsupp() {
    let mut h = harness();
    // Endpoint 100 reserves nothing, so its domain may map 0x1000_0000…
    assert_eq!(h.attach(1, 100), Status::Ok);
    assert_eq!(h.map(1, 0x1000_0000, 0x1000_0fff, 0, RW), Status::Ok);
    // …which endpoint 8 reserves: it cannot join that domain.
    assert_eq!(h.attach(1, 8), Status::Unsupp);
    assert_eq!(h.dev.endpoint_state(8), Some(EndpointState::Blocked));
    // A domain without a clashing mapping accepts it.
    assert_eq!(h.attach(2, 100), Status::Ok);
    assert_eq!(h.attach(2, 8), Status::Ok);
}

#[test]
fn dev_att_8_accepted_attach_results_in_an_attached_endpoint() {
    let mut h = harness();
    assert_eq!(h.attach(3, 2), Status::Ok);
    assert_eq!(h.dev.endpoint_state(2), Some(EndpointState::Domain(3)));
    assert_eq!(h.map(3, 0x2000, 0x2fff, 0x9000, R), Status::Ok);
    assert_eq!(h.gpa(2, 0x2abc, Access::Read), Some(0x9abc));
    assert_eq!(h.detach(3, 2), Status::Ok);
}

#[test]
fn dev_att_9_attach_creates_a_missing_domain() {
    let mut h = harness();
    assert_eq!(h.map(7, 0, 0xfff, 0, RW), Status::NoEnt);
    assert_eq!(h.attach(7, 0), Status::Ok);
    assert_eq!(h.map(7, 0, 0xfff, 0, RW), Status::Ok);
    assert_eq!(h.dev.domain_count(), 1);
}

#[test]
fn dev_att_10_endpoints_in_different_domains_are_isolated() {
    let mut h = harness();
    assert_eq!(h.attach(1, 1), Status::Ok);
    assert_eq!(h.attach(2, 2), Status::Ok);
    assert_eq!(h.map(1, 0xa000, 0xafff, 0x1000, RW), Status::Ok);
    assert_eq!(h.map(2, 0xb000, 0xbfff, 0x2000, RW), Status::Ok);
    assert_eq!(h.gpa(1, 0xa000, Access::Read), Some(0x1000));
    assert_eq!(h.gpa(2, 0xb000, Access::Read), Some(0x2000));
    assert_eq!(h.gpa(1, 0xb000, Access::Read), None);
    assert_eq!(h.gpa(2, 0xa000, Access::Read), None);
}

#[test]
fn dev_att_11_bypass_domain_translates_by_identity_even_with_bypass_off() {
    let mut h = harness();
    assert_eq!(h.dev.config_space().bypass, 0);
    assert_eq!(h.attach_bypass(3, 0), Status::Ok);
    assert_eq!(h.gpa(0, 0x1234_5678, Access::Write), Some(0x1234_5678));
    assert_eq!(h.dev.endpoint_state(0), Some(EndpointState::Bypass));
}

#[test]
fn dev_att_11_bypass_flag_without_bypass_config_negotiated_is_inval() {
    // AMB-6: the flag is not defined for this driver, so it is unknown.
    let mut cfg = test_config();
    cfg.bypass_config = true;
    let offered = viommu_core::Device::new(cfg.clone())
        .unwrap()
        .offered_features();
    let acked = offered.with(
        virtio_iommu_proto::features::VIRTIO_IOMMU_F_BYPASS_CONFIG,
        false,
    );
    let mut h = harness_with(cfg, Some(acked));
    assert_eq!(h.attach_bypass(3, 0), Status::Inval);
    assert_eq!(h.dev.domain_count(), 0);
}

#[test]
fn amb_12_attach_to_the_current_domain_is_idempotent() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    h.log.take();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert!(h.log.changes.is_empty(), "no change, so no grace period");
    assert_eq!(h.gpa(0, 0x1000, Access::Read), Some(0x5000));
}

#[test]
fn dev_ops_11_domain_outside_domain_range_is_range() {
    let mut h = harness();
    assert_eq!(h.attach(1024, 0), Status::Range);
    assert_eq!(h.attach(u32::MAX, 0), Status::Range);
    assert_eq!(h.attach(1023, 0), Status::Ok);
    // Without F_DOMAIN_RANGE every 32-bit ID is valid.
    let mut cfg = test_config();
    cfg.domain_range = None;
    let mut h = harness_with(cfg, None);
    assert_eq!(h.attach(u32::MAX, 0), Status::Ok);
    assert_eq!(h.dev.config_space().domain_range.end, u32::MAX);
}

#[test]
fn limits_too_many_domains_is_nomem() {
    let mut cfg = test_config();
    cfg.limits.max_domains = 2;
    let mut h = harness_with(cfg, None);
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.attach(2, 1), Status::Ok);
    assert_eq!(h.attach(3, 2), Status::NoMem);
    assert_eq!(h.dev.endpoint_state(2), Some(EndpointState::Blocked));
    // Moving the only endpoint of a domain frees its slot first.
    assert_eq!(h.attach(3, 1), Status::Ok);
    assert_eq!(h.dev.domain_count(), 2);
}

#[test]
fn dev_det_1_reserved_bytes_are_ignored() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    let mut bytes = Request::Detach(virtio_iommu_proto::Detach {
        domain: 1,
        endpoint: 0,
    })
    .encode();
    bytes[12..20].copy_from_slice(&[0xff; 8]);
    let out = h.raw(&bytes, 4);
    assert_eq!(out.status_at(0), Some(Status::Ok));
    assert_eq!(h.dev.endpoint_state(0), Some(EndpointState::Blocked));
}

#[test]
fn dev_det_2_unknown_endpoint_is_noent() {
    let mut h = harness();
    assert_eq!(h.detach(0, UNKNOWN_EP), Status::NoEnt);
}

#[test]
fn dev_det_3_mismatched_domain_is_inval_and_changes_nothing() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    h.log.take();
    assert_eq!(h.detach(9, 0), Status::Inval);
    assert_eq!(h.detach(1, 1), Status::Inval, "endpoint 1 is not attached");
    assert_eq!(h.dev.endpoint_state(0), Some(EndpointState::Domain(1)));
    assert!(h.log.changes.is_empty());
}

#[test]
fn dev_det_4_5_detached_endpoint_follows_the_unattached_rule() {
    for bypass in [0u8, 1] {
        let mut h = harness();
        h.dev.write_config(0x24, &[bypass], &mut h.log).unwrap();
        assert_eq!(h.attach(1, 0), Status::Ok);
        assert_eq!(h.map(1, 0x4000, 0x4fff, 0x7000, RW), Status::Ok);
        assert_eq!(h.detach(1, 0), Status::Ok);
        let got = h.xlate(0, 0x4000, Access::Read);
        if bypass == 1 {
            assert_eq!(got.unwrap().gpa, 0x4000, "identity, never the mapped PA");
        } else {
            match got {
                Err(viommu_core::TranslateError::Fault(f)) => {
                    assert_eq!(f.reason, FaultReason::Domain)
                }
                other => panic!("expected a DOMAIN fault, got {other:?}"),
            }
        }
    }
}

#[test]
fn dev_det_6_last_detach_destroys_the_domain_and_its_mappings() {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x4000, 0x4fff, 0x7000, RW), Status::Ok);
    h.log.take();
    assert_eq!(h.detach(1, 0), Status::Ok);
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
    assert_eq!(h.map(1, 0x4000, 0x4fff, 0x7000, RW), Status::NoEnt);
    assert_eq!(h.dev.mapping_count(), 0);
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.gpa(0, 0x4000, Access::Read), None, "old mapping is gone");
    // The replayed MAP that Linux sends (interop A6) succeeds.
    assert_eq!(h.map(1, 0x4000, 0x4fff, 0x7000, RW), Status::Ok);
    assert_eq!(h.detach(1, 0), Status::Ok);
    // The ID may come back as a bypass domain.
    assert_eq!(h.attach_bypass(1, 0), Status::Ok);
}
