//! Translation queries against the model: what an endpoint's DMA access to
//! an IOVA reaches, or the fault it raises.

use virtio_iommu_proto::{FaultFlags, FaultRecord};

/// The kind of a DMA access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device reads memory.
    Read,
    /// The device writes memory.
    Write,
    /// Both (e.g. an atomic operation).
    ReadWrite,
}

impl Access {
    /// The access as fault flags (READ and/or WRITE).
    pub const fn fault_flags(self) -> FaultFlags {
        match self {
            Access::Read => FaultFlags::READ,
            Access::Write => FaultFlags::WRITE,
            Access::ReadWrite => FaultFlags(FaultFlags::READ.0 | FaultFlags::WRITE.0),
        }
    }

    /// Whether the access reads.
    pub const fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    /// Whether the access writes.
    pub const fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// Guest-physical address of the IOVA.
    pub gpa: u64,
    /// Last IOVA (inclusive) up to which the translation stays contiguous
    /// with the same permissions.
    pub iova_last: u64,
    /// The target is device memory (an MMIO mapping or an MSI doorbell).
    pub mmio: bool,
}

/// A failed translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// No such endpoint: nothing to report to the guest.
    #[error("unknown endpoint {0:#x}")]
    UnknownEndpoint(u32),
    /// The access faults; the record is what the event queue reports.
    #[error("fault {0:?}")]
    Fault(FaultRecord),
}
