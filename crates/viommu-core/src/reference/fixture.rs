//! The fixed device the reference model describes: three endpoint ranges
//! with different reserved regions, a small domain range and small limits,
//! so that random request sequences hit every rule and every limit.

use crate::{DeviceConfig, EndpointRange, Limits};
use virtio_iommu_proto::config::{DomainRange, InputRange};
use virtio_iommu_proto::probe::{ResvMem, ResvSubtype};

/// The x86 MSI window (endpoints 0–3).
pub const MSI: ResvMem = ResvMem {
    subtype: ResvSubtype::Msi,
    start: 0xfee0_0000,
    end: 0xfeef_ffff,
};
/// A RESERVED region (endpoints 8–9).
pub const RESERVED: ResvMem = ResvMem {
    subtype: ResvSubtype::Reserved,
    start: 0x1000_0000,
    end: 0x1000_ffff,
};
/// An MSI window at the Arm address (endpoints 8–9).
pub const MSI_ARM: ResvMem = ResvMem {
    subtype: ResvSubtype::Msi,
    start: 0x0800_0000,
    end: 0x080f_ffff,
};
/// The input range: IOVA 0 to 0xfff cannot be mapped.
pub const INPUT: InputRange = InputRange {
    start: 0x1000,
    end: 0xffff_ffff_ffff,
};
/// Domains 0 to 15.
pub const DOMAINS: DomainRange = DomainRange { start: 0, end: 15 };
/// Few domains and mappings, so that NOMEM is reached.
pub const LIMITS: Limits = Limits {
    max_domains: 4,
    max_mappings_per_domain: 6,
    max_mappings: 10,
};

/// The reserved regions of endpoint `ep`.
pub fn resv_of(ep: u32) -> &'static [ResvMem] {
    match ep {
        0..=3 => &[MSI],
        8 | 9 => &[RESERVED, MSI_ARM],
        _ => &[],
    }
}

/// Whether the device has endpoint `ep` (0–3, 8–9 and 100).
pub fn endpoint_exists(ep: u32) -> bool {
    matches!(ep, 0..=3 | 8 | 9 | 100)
}

/// The device's configuration with `page_size_mask`.
pub fn config(page_size_mask: u64) -> DeviceConfig {
    let range = |first, last| EndpointRange {
        first,
        last,
        resv: resv_of(first).to_vec(),
    };
    DeviceConfig {
        endpoints: vec![range(0, 3), range(8, 9), range(100, 100)],
        page_size_mask,
        input_range: Some(INPUT),
        domain_range: Some(DOMAINS),
        probe_size: Some(64),
        mmio: false,
        bypass_config: true,
        legacy_bypass: false,
        initial_bypass: false,
        limits: LIMITS,
    }
}
