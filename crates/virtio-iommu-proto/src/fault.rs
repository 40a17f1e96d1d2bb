//! Fault records written to the event queue.

use crate::wire::FaultWire;
use zerocopy::{FromBytes, IntoBytes};

/// Size of a fault record.
pub const FAULT_RECORD_LEN: usize = core::mem::size_of::<FaultWire>();

/// `VIRTIO_IOMMU_FAULT_R_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// Internal error, or none of the others.
    Unknown = 0,
    /// The endpoint is not attached to a domain and not in bypass.
    Domain = 1,
    /// The address is not mapped, or the flags forbid the access.
    Mapping = 2,
}

/// `VIRTIO_IOMMU_FAULT_F_*` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FaultFlags(pub u32);

impl FaultFlags {
    /// The faulting access was a read.
    pub const READ: FaultFlags = FaultFlags(1 << 0);
    /// The faulting access was a write.
    pub const WRITE: FaultFlags = FaultFlags(1 << 1);
    /// `address` is valid.
    pub const ADDRESS: FaultFlags = FaultFlags(1 << 8);
    /// Every flag the spec defines (the header's EXEC bit 2 is not one).
    pub const KNOWN: FaultFlags = FaultFlags(0x103);

    /// Union of both sets.
    pub const fn union(self, other: FaultFlags) -> FaultFlags {
        FaultFlags(self.0 | other.0)
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: FaultFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A fault to report to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultRecord {
    /// Why the access failed.
    pub reason: FaultReason,
    /// READ and/or WRITE for the access; ADDRESS is derived from `address`.
    pub access: FaultFlags,
    /// The endpoint that made the access.
    pub endpoint: u32,
    /// The faulting IOVA, if known.
    pub address: Option<u64>,
}

impl FaultRecord {
    /// The 24 bytes of the record: reserved fields zero, undefined flag bits
    /// clear, ADDRESS set exactly when an address is given.
    pub fn to_bytes(&self) -> [u8; FAULT_RECORD_LEN] {
        let mut flags = FaultFlags(self.access.0 & (FaultFlags::READ.0 | FaultFlags::WRITE.0));
        if self.address.is_some() {
            flags = flags.union(FaultFlags::ADDRESS);
        }
        let wire = FaultWire {
            reason: self.reason as u8,
            reserved: [0; 3],
            flags: flags.0.into(),
            endpoint: self.endpoint.into(),
            reserved1: 0.into(),
            address: self.address.unwrap_or(0).into(),
        };
        let mut out = [0u8; FAULT_RECORD_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// Decodes a record as a spec-following driver would: `None` if the
    /// reserved bytes are not zero; unknown reasons read as UNKNOWN.
    pub fn from_bytes(bytes: &[u8; FAULT_RECORD_LEN]) -> Option<FaultRecord> {
        let wire = FaultWire::read_from_bytes(bytes).ok()?;
        if wire.reserved != [0; 3] {
            return None;
        }
        let flags = FaultFlags(wire.flags.get());
        Some(FaultRecord {
            reason: match wire.reason {
                1 => FaultReason::Domain,
                2 => FaultReason::Mapping,
                _ => FaultReason::Unknown,
            },
            access: FaultFlags(flags.0 & (FaultFlags::READ.0 | FaultFlags::WRITE.0)),
            endpoint: wire.endpoint.get(),
            address: flags
                .contains(FaultFlags::ADDRESS)
                .then(|| wire.address.get()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_fault_1_2_record_layout_and_clean_bits() {
        let rec = FaultRecord {
            reason: FaultReason::Mapping,
            access: FaultFlags(FaultFlags::WRITE.0 | 0x4 | 0x8000_0000),
            endpoint: 0x20,
            address: Some(0xdead_b000),
        };
        let b = rec.to_bytes();
        assert_eq!(b[0], 2);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        let flags = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        assert_eq!(flags, 0x102);
        assert_eq!(flags & !FaultFlags::KNOWN.0, 0);
        assert_eq!(&b[8..12], &0x20u32.to_le_bytes());
        assert_eq!(&b[12..16], &[0, 0, 0, 0]);
        assert_eq!(&b[16..24], &0xdead_b000u64.to_le_bytes());
        let back = FaultRecord::from_bytes(&b).unwrap();
        assert_eq!(back.address, Some(0xdead_b000));
        assert_eq!(back.access, FaultFlags::WRITE);
    }

    #[test]
    fn no_address_means_no_address_flag_and_zero_address() {
        let rec = FaultRecord {
            reason: FaultReason::Domain,
            access: FaultFlags::READ,
            endpoint: 1,
            address: None,
        };
        let b = rec.to_bytes();
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 1);
        assert_eq!(&b[16..24], &[0; 8]);
        assert_eq!(FaultRecord::from_bytes(&b), Some(rec));
    }

    #[test]
    fn drivers_drop_records_with_reserved_bytes() {
        let mut b = FaultRecord {
            reason: FaultReason::Domain,
            access: FaultFlags::READ,
            endpoint: 1,
            address: None,
        }
        .to_bytes();
        b[2] = 1;
        assert_eq!(FaultRecord::from_bytes(&b), None);
    }
}
