//! The 40-byte device configuration space.

use crate::wire::ConfigWire;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// Size of the configuration space.
pub const CONFIG_LEN: usize = core::mem::size_of::<ConfigWire>();
/// Offset of the `bypass` byte, the only field a driver may write.
pub const BYPASS_OFFSET: usize = core::mem::offset_of!(ConfigWire, bypass);

/// Inclusive range of IOVAs the device can translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InputRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA, inclusive.
    pub end: u64,
}

impl InputRange {
    /// The whole 64-bit space, which applies when `F_INPUT_RANGE` is not offered.
    pub const FULL: InputRange = InputRange {
        start: 0,
        end: u64::MAX,
    };

    /// Whether `[start, end]` lies inside the range.
    pub const fn contains(self, start: u64, end: u64) -> bool {
        start >= self.start && end <= self.end
    }
}

/// Inclusive range of domain IDs the device supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DomainRange {
    /// First domain ID.
    pub start: u32,
    /// Last domain ID, inclusive.
    pub end: u32,
}

impl DomainRange {
    /// Every 32-bit ID, which applies when `F_DOMAIN_RANGE` is not offered.
    pub const FULL: DomainRange = DomainRange {
        start: 0,
        end: u32::MAX,
    };

    /// Whether `domain` is in the range.
    pub const fn contains(self, domain: u32) -> bool {
        domain >= self.start && domain <= self.end
    }
}

/// `struct virtio_iommu_config`, typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Supported page sizes; the lowest set bit is the MAP granule.
    pub page_size_mask: u64,
    /// IOVA window.
    pub input_range: InputRange,
    /// Domain ID window.
    pub domain_range: DomainRange,
    /// Exact PROBE properties size.
    pub probe_size: u32,
    /// The `bypass` byte (0 or 1).
    pub bypass: u8,
}

impl ConfigSpace {
    /// The little-endian bytes a driver reads (reserved bytes zero).
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let wire = ConfigWire {
            page_size_mask: self.page_size_mask.into(),
            input_start: self.input_range.start.into(),
            input_end: self.input_range.end.into(),
            domain_start: self.domain_range.start.into(),
            domain_end: self.domain_range.end.into(),
            probe_size: self.probe_size.into(),
            bypass: self.bypass,
            reserved: [0; 3],
        };
        let mut out = [0u8; CONFIG_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// Decodes the config space from its bytes (as a driver would read them).
    pub fn from_bytes(bytes: &[u8; CONFIG_LEN]) -> ConfigSpace {
        // A 40-byte array always holds a `ConfigWire`: the sizes are equal and
        // the struct has alignment 1.
        let wire = ConfigWire::read_from_bytes(bytes).unwrap_or_else(|_| ConfigWire::new_zeroed());
        ConfigSpace {
            page_size_mask: wire.page_size_mask.get(),
            input_range: InputRange {
                start: wire.input_start.get(),
                end: wire.input_end.get(),
            },
            domain_range: DomainRange {
                start: wire.domain_start.get(),
                end: wire.domain_end.get(),
            },
            probe_size: wire.probe_size.get(),
            bypass: wire.bypass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cfg_8_fields_at_fixed_little_endian_offsets() {
        let cfg = ConfigSpace {
            page_size_mask: 0x4020_1000,
            input_range: InputRange {
                start: 0x1000,
                end: 0xffff_ffff_ffff,
            },
            domain_range: DomainRange {
                start: 1,
                end: 0xfffe,
            },
            probe_size: 512,
            bypass: 1,
        };
        let b = cfg.to_bytes();
        assert_eq!(&b[0..8], &0x4020_1000u64.to_le_bytes());
        assert_eq!(&b[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(&b[16..24], &0xffff_ffff_ffffu64.to_le_bytes());
        assert_eq!(&b[24..28], &1u32.to_le_bytes());
        assert_eq!(&b[28..32], &0xfffeu32.to_le_bytes());
        assert_eq!(&b[32..36], &512u32.to_le_bytes());
        assert_eq!(b[BYPASS_OFFSET], 1);
        assert_eq!(BYPASS_OFFSET, 0x24);
        assert_eq!(&b[0x25..0x28], &[0, 0, 0]);
        assert_eq!(ConfigSpace::from_bytes(&b), cfg);
    }

    #[test]
    fn ranges_are_inclusive() {
        let r = InputRange { start: 10, end: 20 };
        assert!(r.contains(10, 20));
        assert!(!r.contains(9, 20));
        assert!(!r.contains(10, 21));
        assert!(InputRange::FULL.contains(0, u64::MAX));
        let d = DomainRange { start: 1, end: 1 };
        assert!(d.contains(1));
        assert!(!d.contains(0) && !d.contains(2));
    }
}
