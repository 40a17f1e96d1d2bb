//! PROBE properties: the RESV_MEM property, a writer that fills a properties
//! area, and a reader that walks one the way the spec tells drivers to.

use crate::wire::{PropertyHead, ResvMemProp};
use zerocopy::{FromBytes, IntoBytes};

/// `VIRTIO_IOMMU_PROBE_T_NONE`: type 0 ends the list.
pub const VIRTIO_IOMMU_PROBE_T_NONE: u16 = 0;
/// `VIRTIO_IOMMU_PROBE_T_RESV_MEM`.
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// The type is the low 12 bits of the first le16; bits 12–15 are reserved.
pub const VIRTIO_IOMMU_PROBE_T_MASK: u16 = 0xfff;
/// Size of a property header.
pub const PROPERTY_HEAD_LEN: usize = core::mem::size_of::<PropertyHead>();
/// Size of a whole RESV_MEM property, header included.
pub const RESV_MEM_PROP_LEN: usize = core::mem::size_of::<ResvMemProp>();
/// The RESV_MEM `length` field: the value without its header (20).
pub const RESV_MEM_VALUE_LEN: u16 = (RESV_MEM_PROP_LEN - PROPERTY_HEAD_LEN) as u16;

/// `VIRTIO_IOMMU_RESV_MEM_T_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResvSubtype {
    /// The driver must not map these IOVAs; accesses fault.
    Reserved = 0,
    /// An MSI doorbell window; also un-mappable.
    Msi = 1,
}

impl ResvSubtype {
    /// The subtype of a wire byte; drivers treat unknown ones as RESERVED.
    pub const fn from_u8(v: u8) -> ResvSubtype {
        match v {
            1 => ResvSubtype::Msi,
            _ => ResvSubtype::Reserved,
        }
    }
}

/// One reserved IOVA region of an endpoint, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResvMem {
    /// What the region is.
    pub subtype: ResvSubtype,
    /// First IOVA.
    pub start: u64,
    /// Last IOVA, inclusive.
    pub end: u64,
}

impl ResvMem {
    /// Whether the region and `[start, end]` share at least one address.
    pub const fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    /// Whether `iova` is inside the region.
    pub const fn contains(&self, iova: u64) -> bool {
        self.start <= iova && iova <= self.end
    }
}

/// The properties area is too small for the properties to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("properties need {need} bytes but the area has {have}")]
pub struct AreaTooSmall {
    /// Bytes needed so far.
    pub need: usize,
    /// Size of the area.
    pub have: usize,
}

/// Fills a PROBE properties area front to back.
///
/// The area is zero-filled on creation, so whatever is not written reads as
/// the type-0 terminator (DEV-PROBE-8).
pub struct PropertyWriter<'a> {
    area: &'a mut [u8],
    used: usize,
}

impl<'a> PropertyWriter<'a> {
    /// Zero-fills `area` and starts writing at its first byte.
    pub fn new(area: &'a mut [u8]) -> Self {
        area.fill(0);
        PropertyWriter { area, used: 0 }
    }

    /// Appends one RESV_MEM property (type 1, length 20, reserved zero).
    pub fn push_resv_mem(&mut self, region: &ResvMem) -> Result<(), AreaTooSmall> {
        let prop = ResvMemProp {
            head: PropertyHead {
                prop_type: VIRTIO_IOMMU_PROBE_T_RESV_MEM.into(),
                length: RESV_MEM_VALUE_LEN.into(),
            },
            subtype: region.subtype as u8,
            reserved: [0; 3],
            start: region.start.into(),
            end: region.end.into(),
        };
        let need = self.used + RESV_MEM_PROP_LEN;
        let have = self.area.len();
        let dst = self
            .area
            .get_mut(self.used..need)
            .ok_or(AreaTooSmall { need, have })?;
        dst.copy_from_slice(prop.as_bytes());
        self.used = need;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }
}

/// Bytes `regions` take as RESV_MEM properties.
pub const fn resv_mem_bytes(regions: usize) -> usize {
    regions * RESV_MEM_PROP_LEN
}

/// One property found by [`parse_properties`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Property {
    /// A RESV_MEM property.
    ResvMem(ResvMem),
    /// A property of another type, or one with reserved type bits set.
    Other {
        /// The whole first le16, reserved bits included.
        raw_type: u16,
        /// Offset of its header in the area.
        offset: usize,
        /// Its `length` field.
        length: u16,
    },
}

/// Walks a properties area the way the spec tells drivers to: stop at type 0
/// or at the end of the area; skip unknown types by their length; never read
/// past the area. Returns the properties in order.
pub fn parse_properties(area: &[u8]) -> Vec<Property> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while let Some(rest) = area.get(off..) {
        let Ok((head, _)) = PropertyHead::read_from_prefix(rest) else {
            break;
        };
        let raw_type = head.prop_type.get();
        if raw_type & VIRTIO_IOMMU_PROBE_T_MASK == VIRTIO_IOMMU_PROBE_T_NONE {
            break;
        }
        let length = head.length.get();
        let total = PROPERTY_HEAD_LEN + usize::from(length);
        let Some(body) = rest.get(..total) else {
            break;
        };
        let resv = (raw_type == VIRTIO_IOMMU_PROBE_T_RESV_MEM && length == RESV_MEM_VALUE_LEN)
            .then(|| ResvMemProp::read_from_bytes(body).ok())
            .flatten();
        out.push(match resv {
            Some(p) => Property::ResvMem(ResvMem {
                subtype: ResvSubtype::from_u8(p.subtype),
                start: p.start.get(),
                end: p.end.get(),
            }),
            None => Property::Other {
                raw_type,
                offset: off,
                length,
            },
        });
        off += total;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSI: ResvMem = ResvMem {
        subtype: ResvSubtype::Msi,
        start: 0xfee0_0000,
        end: 0xfeef_ffff,
    };

    #[test]
    fn resv_mem_layout_matches_the_spec() {
        let mut area = [0xaau8; 64];
        let mut w = PropertyWriter::new(&mut area);
        w.push_resv_mem(&MSI).unwrap();
        assert_eq!(w.len(), 24);
        assert_eq!(&area[0..2], &1u16.to_le_bytes());
        assert_eq!(&area[2..4], &20u16.to_le_bytes());
        assert_eq!(area[4], 1);
        assert_eq!(&area[5..8], &[0, 0, 0]);
        assert_eq!(&area[8..16], &0xfee0_0000u64.to_le_bytes());
        assert_eq!(&area[16..24], &0xfeef_ffffu64.to_le_bytes());
        assert!(area[24..].iter().all(|&b| b == 0));
    }

    #[test]
    fn writer_refuses_to_overflow_the_area() {
        let mut area = [0u8; 40];
        let mut w = PropertyWriter::new(&mut area);
        w.push_resv_mem(&MSI).unwrap();
        assert_eq!(
            w.push_resv_mem(&MSI),
            Err(AreaTooSmall { need: 48, have: 40 })
        );
        assert_eq!(w.len(), 24);
    }

    #[test]
    fn parser_walks_skips_unknown_and_stops_at_zero_or_end() {
        let mut area = vec![0u8; 80];
        // Unknown type 0x7 with 4 bytes of value, then RESV_MEM, then the terminator.
        area[0..2].copy_from_slice(&7u16.to_le_bytes());
        area[2..4].copy_from_slice(&4u16.to_le_bytes());
        let mut w = PropertyWriter::new(&mut area[8..]);
        w.push_resv_mem(&MSI).unwrap();
        let props = parse_properties(&area);
        assert_eq!(
            props,
            vec![
                Property::Other {
                    raw_type: 7,
                    offset: 0,
                    length: 4
                },
                Property::ResvMem(MSI)
            ]
        );
        // A property whose length runs past the end is not read.
        let mut area = [0u8; 12];
        area[0..2].copy_from_slice(&1u16.to_le_bytes());
        area[2..4].copy_from_slice(&20u16.to_le_bytes());
        assert!(parse_properties(&area).is_empty());
    }

    #[test]
    fn overlap_is_inclusive() {
        assert!(MSI.overlaps(0xfeef_ffff, 0xffff_ffff));
        assert!(MSI.overlaps(0, 0xfee0_0000));
        assert!(!MSI.overlaps(0, 0xfedf_ffff));
        assert!(MSI.contains(0xfee0_0000) && !MSI.contains(0xfef0_0000));
    }
}
