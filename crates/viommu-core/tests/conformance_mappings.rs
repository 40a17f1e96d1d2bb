//! DEV-MAP-*, DEV-UNMAP-*, and the range rules DEV-OPS-12 / DEV-CFG-2.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use viommu_core::{Access, Change, ChangeLog, ChangeSink, Refused, TranslateError};
use virtio_iommu_proto::features::{VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_MMIO};
use virtio_iommu_proto::{FaultFlags, FaultReason, Map, MapFlags, Request, Status, Unmap};

/// A device with endpoint 0 attached to translated domain 1.
fn attached() -> Harness {
    let mut h = harness();
    assert_eq!(h.attach(1, 0), Status::Ok);
    h
}

fn mapping_fault(h: &Harness, ep: u32, iova: u64, access: Access) -> FaultFlags {
    match h.xlate(ep, iova, access) {
        Err(TranslateError::Fault(f)) => {
            assert_eq!(f.reason, FaultReason::Mapping);
            assert_eq!(f.address, Some(iova));
            f.access
        }
        other => panic!("expected a MAPPING fault, got {other:?}"),
    }
}

#[test]
fn dev_map_1_misaligned_start_phys_or_end_is_range() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1001, 0x1fff, 0x1000, RW), Status::Range);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x1800, RW), Status::Range);
    assert_eq!(h.map(1, 0x1000, 0x1ffe, 0x1000, RW), Status::Range);
    assert_eq!(h.dev.mapping_count(), 0);
    // virt_end = u64::MAX wraps to 0 when +1 and counts as aligned.
    let mut cfg = test_config();
    cfg.input_range = None;
    let mut h = harness_with(cfg, None);
    assert_eq!(h.attach(1, 100), Status::Ok);
    assert_eq!(
        h.map(1, 0xffff_ffff_ffff_f000, u64::MAX, 0x1000, RW),
        Status::Ok
    );
    assert_eq!(h.gpa(100, u64::MAX, Access::Read), Some(0x1fff));
}

#[test]
fn dev_map_2_overlap_is_inval_and_the_first_mapping_is_unchanged() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x2fff, 0x10000, RW), Status::Ok);
    assert_eq!(h.map(1, 0x2000, 0x3fff, 0x20000, RW), Status::Inval);
    assert_eq!(
        h.map(1, 0x1000, 0x2fff, 0x10000, RW),
        Status::Inval,
        "exact duplicate"
    );
    assert_eq!(
        h.map(1, 0x0000, 0xffff, 0x20000, RW),
        Status::Inval,
        "superset"
    );
    assert_eq!(
        h.map(1, 0x1000, 0x1fff, 0x20000, RW),
        Status::Inval,
        "subset"
    );
    assert_eq!(
        h.map(1, 0x3000, 0x3fff, 0x30000, RW),
        Status::Ok,
        "adjacent"
    );
    assert_eq!(
        h.map(1, 0x0000, 0x0fff, 0x40000, RW),
        Status::Ok,
        "adjacent below"
    );
    assert_eq!(h.gpa(0, 0x2fff, Access::Read), Some(0x11fff));
    assert_eq!(h.dev.mapping_count(), 3);
}

#[test]
fn dev_map_3_unknown_flags_and_mmio_without_f_mmio_are_inval() {
    let mut h = attached();
    for flags in [0x8, 0x8000_0000, 0xf] {
        assert_eq!(h.map(1, 0x1000, 0x1fff, 0, MapFlags(flags)), Status::Inval);
    }
    assert_eq!(
        h.map(1, 0x1000, 0x1fff, 0, MapFlags(0x7)),
        Status::Ok,
        "MMIO with F_MMIO negotiated"
    );
    let mut cfg = test_config();
    cfg.mmio = true;
    let offered = viommu_core::Device::new(cfg.clone())
        .unwrap()
        .offered_features();
    let mut h = harness_with(cfg, Some(offered.with(VIRTIO_IOMMU_F_MMIO, false)));
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0, MapFlags(0x5)), Status::Inval);
    assert_eq!(h.dev.mapping_count(), 0);
}

#[test]
fn dev_map_4_unknown_domain_is_noent() {
    let mut h = harness();
    assert_eq!(h.map(42, 0x1000, 0x1fff, 0, RW), Status::NoEnt);
}

#[test]
fn dev_map_5_bypass_domain_is_inval() {
    let mut h = harness();
    assert_eq!(h.attach_bypass(3, 0), Status::Ok);
    assert_eq!(h.map(3, 0x1000, 0x1fff, 0, RW), Status::Inval);
}

#[test]
fn dev_map_6_no_write_through_a_read_only_mapping() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x9000, R), Status::Ok);
    assert_eq!(h.gpa(0, 0x1000, Access::Read), Some(0x9000));
    assert_eq!(
        mapping_fault(&h, 0, 0x1008, Access::Write),
        FaultFlags::WRITE
    );
    assert_eq!(
        mapping_fault(&h, 0, 0x1008, Access::ReadWrite),
        FaultFlags(FaultFlags::READ.0 | FaultFlags::WRITE.0)
    );
}

#[test]
fn dev_map_7_reads_of_a_write_only_mapping_fault() {
    // Documented choice: write-only is expressible, so reads are refused.
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x9000, W), Status::Ok);
    assert_eq!(h.gpa(0, 0x1000, Access::Write), Some(0x9000));
    assert_eq!(mapping_fault(&h, 0, 0x1000, Access::Read), FaultFlags::READ);
}

#[test]
fn dev_map_8_translation_is_offset_linear_over_the_inclusive_range() {
    let mut h = attached();
    assert_eq!(h.attach(1, 1), Status::Ok);
    assert_eq!(h.map(1, 0x10000, 0x1ffff, 0x80000, RW), Status::Ok);
    let t = h.xlate(0, 0x1fffe, Access::Read).unwrap();
    assert_eq!((t.gpa, t.iova_last, t.mmio), (0x8fffe, 0x1ffff, false));
    assert_eq!(h.gpa(0, 0x10000, Access::Read), Some(0x80000));
    assert_eq!(h.gpa(0, 0x20000, Access::Read), None);
    assert_eq!(h.gpa(0, 0xffff, Access::Read), None);
    assert_eq!(h.gpa(1, 0x1fffe, Access::Read), Some(0x8fffe));
}

#[test]
fn dev_map_9_amb_10_flags_zero_is_accepted_but_never_accessible() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x9000, MapFlags(0)), Status::Ok);
    mapping_fault(&h, 0, 0x1000, Access::Read);
    mapping_fault(&h, 0, 0x1000, Access::Write);
    // It still occupies its range.
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x9000, RW), Status::Inval);
}

#[test]
fn dev_map_10_dev_unmap_7_map_unmap_need_f_map_unmap() {
    let cfg = test_config();
    let offered = viommu_core::Device::new(cfg.clone())
        .unwrap()
        .offered_features();
    let mut h = harness_with(cfg, Some(offered.with(VIRTIO_IOMMU_F_MAP_UNMAP, false)));
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0, RW), Status::Unsupp);
    assert_eq!(h.unmap(1, 0x1000, 0x1fff), Status::Unsupp);
    assert_eq!(h.dev.mapping_count(), 0);
}

#[test]
fn dev_map_11_phys_overflow_is_range() {
    let mut h = attached();
    assert_eq!(
        h.map(1, 0x1000, 0x2fff, 0xffff_ffff_ffff_f000, RW),
        Status::Range
    );
    assert_eq!(
        h.map(1, 0x1000, 0x1fff, 0xffff_ffff_ffff_f000, RW),
        Status::Ok,
        "ends exactly at 2^64-1"
    );
    assert_eq!(h.gpa(0, 0x1fff, Access::Read), Some(u64::MAX));
}

#[test]
fn dev_map_12_end_before_start_is_inval_even_when_aligned() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x2000, 0x0fff, 0, RW), Status::Inval);
    assert_eq!(h.dev.mapping_count(), 0);
}

#[test]
fn amb_1_single_byte_mappings_with_a_one_byte_granule() {
    let mut cfg = test_config();
    cfg.page_size_mask = 1;
    let mut h = harness_with(cfg, None);
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.map(1, 0x1234, 0x1234, 0x5678, RW), Status::Ok);
    assert_eq!(h.gpa(0, 0x1234, Access::Read), Some(0x5678));
    assert_eq!(h.gpa(0, 0x1235, Access::Read), None);
    // With a 4 KiB granule the same request is misaligned.
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1000, 0x5000, RW), Status::Range);
}

#[test]
fn dev_cfg_2_only_the_lowest_page_size_bit_is_enforced() {
    let mut cfg = test_config();
    cfg.page_size_mask = 0x4020_1000;
    let mut h = harness_with(cfg, None);
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(
        h.map(1, 0x1000, 0x1fff, 0x3000, RW),
        Status::Ok,
        "AMB-18: 4 KiB is enough"
    );
    assert_eq!(h.map(1, 0x2800, 0x37ff, 0x4000, RW), Status::Range);
}

#[test]
fn dev_ops_12_map_outside_input_range_is_range() {
    let mut cfg = test_config();
    cfg.input_range = Some(virtio_iommu_proto::InputRange {
        start: 0x10_0000,
        end: 0xffff_ffff,
    });
    let mut h = harness_with(cfg, None);
    assert_eq!(h.attach(1, 100), Status::Ok);
    assert_eq!(h.map(1, 0xf_f000, 0x10_0fff, 0, RW), Status::Range);
    assert_eq!(h.map(1, 0xffff_f000, 0x1_0000_0fff, 0, RW), Status::Range);
    assert_eq!(h.map(1, 0x1_0000_0000, 0x1_0000_0fff, 0, RW), Status::Range);
    assert_eq!(h.map(1, 0x10_0000, 0x10_0fff, 0, RW), Status::Ok);
    assert_eq!(h.map(1, 0xffff_f000, 0xffff_ffff, 0, RW), Status::Ok);
    assert_eq!(h.dev.mapping_count(), 2);
}

/// The spec's seven UNMAP examples, each on a fresh address space.
#[test]
fn dev_unmap_4_5_the_spec_examples() {
    // Granule 1 so the examples' byte addresses are legal as written.
    let fresh = |maps: &[(u64, u64)]| {
        let mut cfg = test_config();
        cfg.page_size_mask = 1;
        let mut h = harness_with(cfg, None);
        assert_eq!(h.attach(1, 100), Status::Ok);
        for &(s, e) in maps {
            assert_eq!(h.map(1, s, e, s + 0x1000, RW), Status::Ok);
        }
        h
    };
    let mapped = |h: &Harness, iova| h.gpa(100, iova, Access::Read).is_some();
    // 1: nothing mapped.
    let mut h = fresh(&[]);
    assert_eq!(h.unmap(1, 0, 4), Status::Ok);
    // 2: a=(0,9), unmap (0,9).
    let mut h = fresh(&[(0, 9)]);
    assert_eq!(h.unmap(1, 0, 9), Status::Ok);
    assert!(!mapped(&h, 0));
    // 3: a=(0,4), b=(5,9), unmap (0,9).
    let mut h = fresh(&[(0, 4), (5, 9)]);
    assert_eq!(h.unmap(1, 0, 9), Status::Ok);
    assert!(!mapped(&h, 0) && !mapped(&h, 5));
    // 4: a=(0,9), unmap (0,4) fails, nothing removed.
    let mut h = fresh(&[(0, 9)]);
    assert_eq!(h.unmap(1, 0, 4), Status::Range);
    assert!(mapped(&h, 0) && mapped(&h, 9));
    // 5: a=(0,4), b=(5,9), unmap (0,4): only a.
    let mut h = fresh(&[(0, 4), (5, 9)]);
    assert_eq!(h.unmap(1, 0, 4), Status::Ok);
    assert!(!mapped(&h, 0) && mapped(&h, 5));
    // 6: a=(0,4), unmap (0,9).
    let mut h = fresh(&[(0, 4)]);
    assert_eq!(h.unmap(1, 0, 9), Status::Ok);
    assert!(!mapped(&h, 0));
    // 7: a=(0,4), b=(10,14), unmap (0,14).
    let mut h = fresh(&[(0, 4), (10, 14)]);
    assert_eq!(h.unmap(1, 0, 14), Status::Ok);
    assert!(!mapped(&h, 0) && !mapped(&h, 10));
    assert_eq!(h.dev.mapping_count(), 0);
}

#[test]
fn dev_unmap_4_split_removes_nothing_atomically() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x0000, 0x4fff, 0x10000, RW), Status::Ok);
    assert_eq!(h.map(1, 0xa000, 0x13fff, 0x20000, RW), Status::Ok);
    h.log.take();
    assert_eq!(h.unmap(1, 0x0000, 0xefff), Status::Range);
    assert_eq!(
        h.gpa(0, 0x0000, Access::Read),
        Some(0x10000),
        "a is still there"
    );
    assert_eq!(h.gpa(0, 0xa000, Access::Read), Some(0x20000));
    assert!(h.log.changes.is_empty(), "nothing announced");
    // A split at the start is refused too.
    assert_eq!(h.unmap(1, 0xb000, 0x20000), Status::Range);
    assert_eq!(h.dev.mapping_count(), 2);
}

#[test]
fn dev_unmap_6_adjacent_maps_are_not_merged() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x0000, 0x0fff, 0x10000, RW), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x11000, RW), Status::Ok);
    assert_eq!(h.unmap(1, 0x0000, 0x0fff), Status::Ok);
    assert_eq!(h.gpa(0, 0x1000, Access::Read), Some(0x11000));
    assert_eq!(
        h.unmap(1, 0x0000, 0x1000),
        Status::Range,
        "would split (0x1000, 0x1fff)"
    );
}

#[test]
fn dev_unmap_1_reserved_nonzero_is_ignored() {
    // Documented choice (AMB-14): the reserved bytes are ignored.
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x11000, RW), Status::Ok);
    let status = h.send(Request::Unmap(Unmap {
        domain: 1,
        virt_start: 0x1000,
        virt_end: 0x1fff,
        reserved: [1, 0, 0, 0],
    }));
    assert_eq!(status, Status::Ok);
    assert_eq!(h.gpa(0, 0x1000, Access::Read), None);
}

#[test]
fn dev_unmap_2_unknown_domain_is_noent() {
    let mut h = harness();
    assert_eq!(h.unmap(42, 0, 0xfff), Status::NoEnt);
}

#[test]
fn dev_unmap_3_bypass_domain_is_inval() {
    let mut h = harness();
    assert_eq!(h.attach_bypass(3, 0), Status::Ok);
    assert_eq!(h.unmap(3, 0, 0xfff), Status::Inval);
}

#[test]
fn unmap_end_before_start_is_inval() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x11000, RW), Status::Ok);
    assert_eq!(h.unmap(1, 0x2000, 0x1000), Status::Inval);
    assert_eq!(h.dev.mapping_count(), 1);
}

#[test]
fn amb_4_unmap_beyond_input_range_is_ok() {
    let mut h = attached();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x11000, RW), Status::Ok);
    assert_eq!(h.unmap(1, 0, u64::MAX), Status::Ok);
    assert_eq!(h.dev.mapping_count(), 0);
}

#[test]
fn unmap_announces_each_removed_mapping_with_a_grace_period() {
    let mut h = attached();
    h.log.take();
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0x11000, RW), Status::Ok);
    assert_eq!(h.map(1, 0x3000, 0x3fff, 0x13000, R), Status::Ok);
    let added = h.log.take();
    assert!(
        added
            .iter()
            .all(|c| matches!(c, Change::MappingAdded { .. }) && !c.requires_grace_period())
    );
    assert_eq!(h.unmap(1, 0, 0xffff), Status::Ok);
    let removed = h.log.take();
    assert_eq!(removed.len(), 2);
    assert!(removed.iter().all(
        |c| matches!(c, Change::MappingRemoved { domain: 1, .. }) && c.requires_grace_period()
    ));
}

#[test]
fn dev_resv_4_map_over_a_reserved_region_is_inval() {
    let mut h = attached();
    // Endpoint 0 reserves the x86 MSI window; one page of overlap is enough.
    assert_eq!(h.map(1, 0xfeef_f000, 0xfef0_0fff, 0, RW), Status::Inval);
    assert_eq!(h.map(1, 0xfed0_0000, 0xfee0_0fff, 0, RW), Status::Inval);
    assert_eq!(h.map(1, 0xfef0_0000, 0xfef0_0fff, 0, RW), Status::Ok);
    // Endpoint 8's RESERVED region is off limits once 8 joins the domain.
    assert_eq!(
        h.map(1, 0x1000_0000, 0x1000_0fff, 0, RW),
        Status::Ok,
        "no endpoint reserves it yet"
    );
    assert_eq!(h.unmap(1, 0x1000_0000, 0x1000_0fff), Status::Ok);
    assert_eq!(h.attach(1, 8), Status::Ok);
    assert_eq!(h.map(1, 0x1000_f000, 0x1001_0fff, 0, RW), Status::Inval);
    // When 8 leaves, the region may be mapped again.
    assert_eq!(h.detach(1, 8), Status::Ok);
    assert_eq!(h.map(1, 0x1000_f000, 0x1001_0fff, 0, RW), Status::Ok);
}

#[test]
fn dev_resv_5_msi_window_reaches_the_doorbell_and_reserved_faults() {
    let mut h = harness();
    assert_eq!(h.attach(1, 8), Status::Ok);
    assert_eq!(h.attach(2, 0), Status::Ok);
    // Endpoint 8's MSI window (Arm address) is an identity doorbell, for 8 only.
    let t = h.xlate(8, 0x0800_0040, Access::Write).unwrap();
    assert_eq!(
        (t.gpa, t.iova_last, t.mmio),
        (0x0800_0040, 0x080f_ffff, true)
    );
    assert_eq!(
        h.gpa(0, 0x0800_0040, Access::Write),
        None,
        "not endpoint 0's window"
    );
    // Endpoint 8's RESERVED region faults with MAPPING.
    assert_eq!(
        mapping_fault(&h, 8, 0x1000_0010, Access::Read),
        FaultFlags::READ
    );
    // Endpoint 0's own MSI window.
    assert_eq!(h.gpa(0, 0xfee0_0000, Access::Write), Some(0xfee0_0000));
}

#[test]
fn limits_mapping_counts_answer_nomem() {
    let mut cfg = test_config();
    cfg.limits.max_mappings_per_domain = 2;
    cfg.limits.max_mappings = 3;
    let mut h = harness_with(cfg, None);
    assert_eq!(h.attach(1, 0), Status::Ok);
    assert_eq!(h.attach(2, 1), Status::Ok);
    assert_eq!(h.map(1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    assert_eq!(h.map(1, 0x2000, 0x2fff, 0, RW), Status::Ok);
    assert_eq!(h.map(1, 0x3000, 0x3fff, 0, RW), Status::NoMem, "per domain");
    assert_eq!(h.map(2, 0x1000, 0x1fff, 0, RW), Status::Ok);
    assert_eq!(h.map(2, 0x2000, 0x2fff, 0, RW), Status::NoMem, "in total");
    assert_eq!(h.unmap(1, 0x1000, 0x1fff), Status::Ok);
    assert_eq!(
        h.map(2, 0x2000, 0x2fff, 0, RW),
        Status::Ok,
        "freed by UNMAP"
    );
    assert_eq!(h.detach(1, 0), Status::Ok);
    assert_eq!(h.dev.mapping_count(), 2, "domain 1's mapping went with it");
}

/// A sink whose copy of the mappings is full refuses every new mapping.
#[derive(Default)]
struct FullTable(ChangeLog);

impl ChangeSink for FullTable {
    fn change(&mut self, change: Change) {
        self.0.change(change);
    }
    fn try_add(&mut self, _change: Change) -> Result<(), Refused> {
        Err(Refused)
    }
}

#[test]
fn a_mapping_the_published_table_refuses_is_nomem_and_leaves_nothing() {
    let mut h = attached();
    let map = Request::Map(Map {
        domain: 1,
        virt_start: 0x4000,
        virt_end: 0x4fff,
        phys_start: 0x8000,
        flags: RW,
    });
    let mut full = FullTable::default();
    assert_eq!(h.dev.handle(&map, &mut full), Status::NoMem);
    assert!(full.0.changes.is_empty(), "nothing announced");
    assert_eq!(h.dev.mapping_count(), 0);
    assert_eq!(h.gpa(0, 0x4000, Access::Read), None);
    // Room again: the same MAP goes through and is announced once.
    assert_eq!(h.send(map), Status::Ok);
    assert_eq!(h.dev.mapping_count(), 1);
    assert_eq!(h.gpa(0, 0x4010, Access::Read), Some(0x8010));
}
