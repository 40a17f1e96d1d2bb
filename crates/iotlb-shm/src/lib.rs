//! The shared IOVA→guest-physical translation table of vhost-user-iommu.
//!
//! The daemon ([`TableWriter`]) publishes every domain's mappings into
//! sealed memfds; co-located backends ([`TableReader`]) translate by reading
//! them, lock-free, from their own processes. Revocations (UNMAP, DETACH,
//! re-ATTACH) complete only after a grace period in which every reader
//! session that could hold the old translation has ended, and every pin
//! overlapping it has been released. The byte layout is specified in
//! `docs/shm-layout.md` and in [`layout`].
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use iotlb_shm::{Access, EndpointTarget, Perms, SlotFile, TableReader, TableWriter, WriterConfig};
//! let mut w = TableWriter::new(&WriterConfig::default())?;
//! w.create_domain(1)?;
//! w.set_endpoint(8, EndpointTarget::Domain(1))?;
//! w.map(1, 0x1000, 0x1fff, 0x8000_0000, Perms { read: true, write: true, mmio: false })?;
//! // In the backend (normally another process, fds received by SCM_RIGHTS):
//! let slot_fd = iotlb_shm::slots::create(4, 16)?;
//! w.register_reader(std::os::fd::AsFd::as_fd(&slot_fd), std::process::id() as i32)?;
//! let table = TableReader::open(w.table_fd(), w.arena_fd())?;
//! let mut slot = SlotFile::open(std::os::fd::AsFd::as_fd(&slot_fd))?.claim_slot()?;
//! let session = slot.enter(&table);
//! let piece = session.translate_one(8, 0x1234, Access::WRITE)?;
//! assert_eq!(piece.gpa, 0x8000_0234);
//! drop(session);
//! w.unmap(1, 0x1000, 0x1fff)?;
//! w.synchronize(); // returns once no reader can still use the old entry
//! # Ok(()) }
//! ```

pub mod grace;
pub mod layout;
mod sync;

#[cfg(not(loom))]
mod access;
#[cfg(not(loom))]
pub mod backend_proto;
mod claims;
#[cfg(not(loom))]
pub mod client;
#[cfg(not(loom))]
pub mod drain;
#[cfg(not(loom))]
pub mod geometry;
#[cfg(not(loom))]
mod liveness;
#[cfg(not(loom))]
pub mod memfd;
#[cfg(not(loom))]
pub mod reader;
#[cfg(not(loom))]
pub mod registry;
#[cfg(not(loom))]
pub mod slots;
#[cfg(not(loom))]
pub mod sock_diag;
#[cfg(not(loom))]
pub mod sockopt;
#[cfg(not(loom))]
pub mod writer;

#[cfg(all(feature = "capi", not(loom)))]
pub mod capi;
#[cfg(all(feature = "vm-memory", not(loom)))]
pub mod vm_memory;

#[cfg(not(loom))]
pub use access::{Access, Fault, FaultKind, Piece};
#[cfg(not(loom))]
pub use client::{BackendClient, ClientError};
#[cfg(not(loom))]
pub use drain::{SentinelSlot, TrackError, TrackedIo};
#[cfg(not(loom))]
pub use geometry::{Geometry, GeometryError};
#[cfg(not(loom))]
pub use reader::{OpenError, Pieces, Pin, PinError, ReaderSlot, Session, TableReader};
#[cfg(not(loom))]
pub use registry::{ReaderId, ReaderProcess, ReaderState, ReleaseReason};
#[cfg(not(loom))]
pub use slots::{SlotError, SlotFile};
#[cfg(not(loom))]
pub use writer::{
    EndpointTarget, GraceReport, Perms, StallPolicy, TableWriter, WriterConfig, WriterError,
    WriterStats,
};

/// The atomics the protocol runs on (loom's under `cfg(loom)`), for the
/// loom models.
pub use sync::{AtomicU64, Ordering, fence};
