//! A vhost-user-blk backend whose DMA can go through the guest's
//! virtio-iommu (`viommu-backend`: none, shared-table or IOTLB-message
//! translation).
//!
//! The I/O parts: [`target`] (the disk: file, block device or null),
//! [`engine`] (one io_uring per queue thread), [`backend`] (the vhost-user
//! device), [`serve`] (the listening loop), [`settings`] (the command line).
//! The other modules are the pure device logic.
//!
//! Everything here follows virtio 1.2 §5.2 (block device) and does no I/O:
//! no vhost types, no guest memory, no io_uring. The I/O code
//!
//! 1. describes a descriptor chain as [`Segment`]s and splits it with
//!    [`layout`](fn@layout) (or, when that fails, answers IOERR at
//!    [`status_piece`]),
//! 2. gathers the 16 header bytes ([`pieces`] maps stream ranges back to
//!    segments) and parses them with [`RequestHeader::from_bytes`],
//! 3. asks [`plan`](fn@plan) what to do and does it (for DISCARD and
//!    WRITE_ZEROES after [`parse_segments`] and [`check_segments`]),
//! 4. writes the [`Status`] byte and reports [`used_len`] bytes.
//!
//! [`offered_features`] and [`BlkConfig`] describe the device to the driver;
//! [`write_cache`] says whether completed writes must already be durable.

pub mod backend;
pub mod cache;
pub mod config;
pub mod disk;
pub mod engine;
pub mod features;
pub mod layout;
pub mod limits;
pub mod plan;
pub mod request;
pub mod segments;
pub mod serial;
pub mod serve;
pub mod settings;
pub mod target;

pub use cache::{WriteCache, write_cache};
pub use config::{BlkConfig, CONFIG_LEN, ConfigWriteError, Geometry, Topology};
pub use disk::{DiskError, DiskInfo};
pub use features::offered_features;
pub use layout::{
    ByteRange, ChainLayout, MAX_CHAIN_BYTES, Malformed, Piece, Segment, Stream, layout, pieces,
    status_piece,
};
pub use plan::{Plan, plan, used_len};
pub use request::{HEADER_LEN, RequestHeader, SECTOR_SIZE, Status};
pub use segments::{DiscardSegment, SegmentOp, check_segments, parse_segments};
pub use serial::{ID_BYTES, id_bytes};
