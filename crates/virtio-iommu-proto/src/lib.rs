//! The virtio-iommu wire format (virtio 1.2–1.4, section 5.13; device ID 23).
//!
//! Pure data: constants, little-endian wire structs whose sizes and offsets are
//! checked at compile time, a parser that turns a request's device-readable
//! bytes into a typed [`Request`] (or a typed reason it is malformed), and
//! encoders for the request tail, PROBE properties and fault records.
//!
//! Nothing here does I/O or knows about virtqueues: the caller gathers the
//! readable bytes of a descriptor chain (however the descriptors split them)
//! and hands them to [`parse_request`].

pub mod config;
pub mod fault;
pub mod features;
pub mod probe;
pub mod request;
pub mod status;
pub mod wire;

pub use config::{ConfigSpace, DomainRange, InputRange};
pub use fault::{FaultFlags, FaultReason, FaultRecord};
pub use features::Features;
pub use probe::{PropertyWriter, ResvMem, ResvSubtype};
pub use request::{
    Attach, Detach, Map, MapFlags, ParseError, Probe, Request, RequestType, Unmap, parse_request,
};
pub use status::Status;

/// virtio device ID of the IOMMU device.
pub const VIRTIO_ID_IOMMU: u32 = 23;
/// Index of the request virtqueue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the event virtqueue.
pub const EVENT_QUEUE: u16 = 1;
/// The device has exactly two virtqueues.
pub const NUM_QUEUES: usize = 2;
