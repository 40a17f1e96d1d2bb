//! DMA through a guest's virtio-iommu for co-located vhost-user backends.
//!
//! A backend whose device sits behind the `vhost-user-iommu` daemon gets
//! descriptor and ring addresses that are IOVAs of its endpoint. This crate
//! is what such a backend needs to use them, in one of three modes
//! ([`IommuMode`], `--iommu`):
//!
//! - `none`: addresses are guest-physical;
//! - `table:SOCKET`: IOVAs are translated through the daemon's shared table
//!   (`iotlb-shm`), lock-free, inside one session per batch; the ranges of
//!   in-flight I/O are pinned so the guest's UNMAP waits for them;
//! - `iotlb-msg:SOCKET`: a private IOTLB filled by messages (the baseline).
//!
//! - [`dma`]: the device's translation handles ([`Dma`], [`QueueDma`],
//!   [`Batch`], [`IoHold`]);
//! - [`ring`]: the device side of a split virtqueue at device addresses;
//! - [`guest`]: guest-physical to host addresses through the memory table;
//! - [`msg`]: the message-mode IOTLB;
//! - [`mode`]: `--iommu` values.

pub mod dma;
pub mod error;
pub mod guest;
pub mod mode;
pub mod msg;
pub mod ring;

pub use dma::{Batch, Dma, DmaOptions, IoHold, QueueDma, SetupError};
pub use error::DmaError;
pub use guest::RamAccess;
pub use iotlb_shm::{Access, Fault, FaultKind};
pub use mode::IommuMode;
pub use ring::{Chain, RingAddrs, RingError, RingMemory, RingView, Segment, SplitQueue};
