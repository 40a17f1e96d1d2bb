//! Why a device address could not be used.

use iotlb_shm::{Fault, SlotError};

/// A device address range that cannot be accessed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DmaError {
    /// The IOMMU refused the access (a fault record for the guest).
    #[error("translation fault")]
    Fault(#[from] Fault),
    /// The range (or the guest-physical range it translates to) lies
    /// outside guest RAM as the VMM's memory table describes it.
    #[error("guest-physical range {gpa:#x}+{len:#x} is outside guest RAM")]
    OutsideRam {
        /// First guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range translates to MMIO, which a backend cannot access.
    #[error("range at {addr:#x} translates to MMIO")]
    Mmio {
        /// The device address.
        addr: u64,
    },
    /// A range that must be contiguous in host memory (a ring) is not.
    #[error("range {addr:#x}+{len:#x} is not contiguous in guest memory")]
    NotContiguous {
        /// The device address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// No pin record is free for in-flight I/O.
    #[error("no pin record is free: {0}")]
    NoPin(String),
    /// The VMM has not sent its memory table yet.
    #[error("no guest memory table yet")]
    NoMemory,
}

impl From<SlotError> for DmaError {
    fn from(e: SlotError) -> Self {
        DmaError::NoPin(e.to_string())
    }
}

impl DmaError {
    /// The fault to report to the daemon, if the IOMMU refused the access.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            DmaError::Fault(f) => Some(f),
            _ => None,
        }
    }
}
