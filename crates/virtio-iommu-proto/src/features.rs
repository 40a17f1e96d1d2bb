//! Feature bits (section 2 of the conformance file).

/// `input_range` in the config space is valid.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
/// `domain_range` in the config space is valid.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
/// MAP and UNMAP requests are available.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
/// Legacy: unattached endpoints bypass when negotiated.
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
/// PROBE requests are available; `probe_size` is valid.
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
/// The MAP flag `VIRTIO_IOMMU_MAP_F_MMIO` may be used.
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
/// The `bypass` config byte and the ATTACH bypass flag are available.
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;
/// Generic: the device complies with virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Generic: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Generic: used/avail event index suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// A set of 64 feature bits, as offered by the device or acked by the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features(pub u64);

impl Features {
    /// The empty set.
    pub const EMPTY: Features = Features(0);

    /// The set holding exactly the given bit numbers.
    pub const fn from_bits(bits: &[u32]) -> Features {
        let mut mask = 0u64;
        let mut i = 0;
        while i < bits.len() {
            mask |= 1u64 << bits[i];
            i += 1;
        }
        Features(mask)
    }

    /// Whether bit `bit` is in the set (bits ≥ 64 never are).
    pub const fn has(self, bit: u32) -> bool {
        bit < 64 && self.0 & (1u64 << bit) != 0
    }

    /// This set with `bit` added or removed.
    pub const fn with(self, bit: u32, on: bool) -> Features {
        if bit >= 64 {
            return self;
        }
        if on {
            Features(self.0 | (1u64 << bit))
        } else {
            Features(self.0 & !(1u64 << bit))
        }
    }

    /// Bits in both sets.
    pub const fn intersect(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// Whether every bit of `self` is in `other`.
    pub const fn is_subset_of(self, other: Features) -> bool {
        self.0 & !other.0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip() {
        let f = Features::from_bits(&[VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_F_VERSION_1]);
        assert_eq!(f.0, (1 << 2) | (1 << 32));
        assert!(f.has(VIRTIO_IOMMU_F_MAP_UNMAP));
        assert!(!f.has(VIRTIO_IOMMU_F_PROBE));
        assert!(!f.has(64));
        assert_eq!(f.with(64, true), f);
        assert!(!f.with(VIRTIO_F_VERSION_1, false).has(VIRTIO_F_VERSION_1));
        assert!(Features(0b100).is_subset_of(f));
        assert!(!Features(0b1000).is_subset_of(f));
    }
}
