//! What a translation is asked for and what it yields.

use std::fmt;

use thiserror::Error;

/// The access a device makes to a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access(u8);

impl Access {
    /// Device reads from memory (e.g. a TX buffer).
    pub const READ: Self = Self(1);
    /// Device writes to memory (e.g. an RX buffer, a used ring).
    pub const WRITE: Self = Self(2);
    /// Both.
    pub const READ_WRITE: Self = Self(3);

    /// The PTE permission bits this access needs.
    #[inline]
    pub(crate) fn pte_bits(self) -> u64 {
        use crate::layout::pte::{READ, WRITE};
        (if self.0 & 1 != 0 { READ } else { 0 }) | (if self.0 & 2 != 0 { WRITE } else { 0 })
    }

    /// Raw bits: 1 read, 2 write.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// From raw bits (anything but 1, 2, 3 is `None`).
    pub fn from_bits(bits: u8) -> Option<Self> {
        matches!(bits, 1..=3).then_some(Self(bits))
    }
}

/// One contiguous guest-physical piece of a translated range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Guest-physical address of the piece's first byte.
    pub gpa: u64,
    /// Length in bytes (for [`crate::Session::translate_one`]: bytes left in
    /// the leaf from the IOVA, saturated at `u64::MAX`).
    pub len: u64,
    /// The target is MMIO rather than RAM.
    pub mmio: bool,
}

/// Why a translation failed (the virtio-iommu fault reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The endpoint is blocked or unknown (reason DOMAIN).
    Domain,
    /// No mapping covers the address (reason MAPPING).
    Mapping,
    /// A mapping covers it without the needed permission (reason MAPPING,
    /// with the access flags set).
    Permission,
    /// The daemon that wrote the table is gone (it exited, crashed or was
    /// killed): nothing translates through its frozen table. Not a guest
    /// error: connect to the (restarted) daemon again
    /// ([`crate::BackendClient::connect`]) to get the current table.
    Detached,
}

/// A failed translation: enough to report a fault record to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{kind:?} fault: endpoint {endpoint:#x} iova {iova:#x} access {access}")]
pub struct Fault {
    /// What went wrong.
    pub kind: FaultKind,
    /// Endpoint ID.
    pub endpoint: u32,
    /// First IOVA that could not be translated.
    pub iova: u64,
    /// The access attempted.
    pub access: Access,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            1 => "read",
            2 => "write",
            _ => "read-write",
        })
    }
}
