//! Little-endian wire structs, exactly as they sit in guest memory.
//!
//! Every struct is `repr(C)` over byte-aligned little-endian fields, so it has
//! no padding and can be read from or written to any byte offset. Sizes and
//! field offsets are asserted at compile time against the conformance file.

use core::mem::{offset_of, size_of};
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

macro_rules! wire_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(C)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty),* }
    };
}

wire_struct! {
    /// `virtio_iommu_req_head`: first 4 readable bytes of every request.
    pub struct ReqHead {
        /// Request type (`VIRTIO_IOMMU_T_*`).
        pub req_type: u8,
        /// Ignored by the device.
        pub reserved: [u8; 3],
    }
}

wire_struct! {
    /// `virtio_iommu_req_tail`: the 4 device-written bytes that end every request.
    pub struct ReqTail {
        /// `VIRTIO_IOMMU_S_*`.
        pub status: u8,
        /// Written as zero.
        pub reserved: [u8; 3],
    }
}

wire_struct! {
    /// `virtio_iommu_req_attach` without its tail (20 readable bytes).
    pub struct AttachReq {
        /// Head, type 1.
        pub head: ReqHead,
        /// Domain ID.
        pub domain: U32,
        /// Endpoint ID.
        pub endpoint: U32,
        /// `VIRTIO_IOMMU_ATTACH_F_*`.
        pub flags: U32,
        /// Must be zero.
        pub reserved: [u8; 4],
    }
}

wire_struct! {
    /// `virtio_iommu_req_detach` without its tail (20 readable bytes).
    pub struct DetachReq {
        /// Head, type 2.
        pub head: ReqHead,
        /// Domain ID.
        pub domain: U32,
        /// Endpoint ID.
        pub endpoint: U32,
        /// Ignored by the device.
        pub reserved: [u8; 8],
    }
}

wire_struct! {
    /// `virtio_iommu_req_map` without its tail (36 readable bytes).
    pub struct MapReq {
        /// Head, type 3.
        pub head: ReqHead,
        /// Domain ID.
        pub domain: U32,
        /// First IOVA.
        pub virt_start: U64,
        /// Last IOVA, inclusive.
        pub virt_end: U64,
        /// Guest-physical address of `virt_start`.
        pub phys_start: U64,
        /// `VIRTIO_IOMMU_MAP_F_*`.
        pub flags: U32,
    }
}

wire_struct! {
    /// `virtio_iommu_req_unmap` without its tail (28 readable bytes).
    pub struct UnmapReq {
        /// Head, type 4.
        pub head: ReqHead,
        /// Domain ID.
        pub domain: U32,
        /// First IOVA.
        pub virt_start: U64,
        /// Last IOVA, inclusive.
        pub virt_end: U64,
        /// Should be zero.
        pub reserved: [u8; 4],
    }
}

wire_struct! {
    /// `virtio_iommu_req_probe` readable part (72 bytes); properties and tail follow in the writable part.
    pub struct ProbeReq {
        /// Head, type 5.
        pub head: ReqHead,
        /// Endpoint ID.
        pub endpoint: U32,
        /// Ignored by the device.
        pub reserved: [u8; 64],
    }
}

wire_struct! {
    /// `struct virtio_iommu_config` (40 bytes).
    pub struct ConfigWire {
        /// Supported page sizes; the lowest set bit is the MAP granule.
        pub page_size_mask: U64,
        /// First IOVA that can be mapped.
        pub input_start: U64,
        /// Last IOVA that can be mapped, inclusive.
        pub input_end: U64,
        /// First supported domain ID.
        pub domain_start: U32,
        /// Last supported domain ID, inclusive.
        pub domain_end: U32,
        /// Exact size of the PROBE properties area.
        pub probe_size: U32,
        /// 1: unattached endpoints bypass the IOMMU.
        pub bypass: u8,
        /// Reserved.
        pub reserved: [u8; 3],
    }
}

wire_struct! {
    /// `struct virtio_iommu_probe_property` header (4 bytes).
    pub struct PropertyHead {
        /// Bits 0–11: type; bits 12–15: reserved.
        pub prop_type: U16,
        /// Size of the value, excluding this header.
        pub length: U16,
    }
}

wire_struct! {
    /// `struct virtio_iommu_probe_resv_mem` (24 bytes including its header).
    pub struct ResvMemProp {
        /// Header: type 1, length 20.
        pub head: PropertyHead,
        /// `VIRTIO_IOMMU_RESV_MEM_T_*`.
        pub subtype: u8,
        /// Zero.
        pub reserved: [u8; 3],
        /// First IOVA of the region.
        pub start: U64,
        /// Last IOVA of the region, inclusive.
        pub end: U64,
    }
}

wire_struct! {
    /// `struct virtio_iommu_fault` (24 bytes), one per eventq buffer.
    pub struct FaultWire {
        /// `VIRTIO_IOMMU_FAULT_R_*`.
        pub reason: u8,
        /// Zero (drivers drop records where it isn't).
        pub reserved: [u8; 3],
        /// `VIRTIO_IOMMU_FAULT_F_*`.
        pub flags: U32,
        /// Endpoint that faulted.
        pub endpoint: U32,
        /// Zero.
        pub reserved1: U32,
        /// Faulting address, valid with `VIRTIO_IOMMU_FAULT_F_ADDRESS`.
        pub address: U64,
    }
}

// Sizes and offsets from the conformance file, sections 3, 4 and 6.
const _: () = {
    assert!(size_of::<ReqHead>() == 4);
    assert!(size_of::<ReqTail>() == 4);

    assert!(size_of::<AttachReq>() == 20);
    assert!(offset_of!(AttachReq, domain) == 4);
    assert!(offset_of!(AttachReq, endpoint) == 8);
    assert!(offset_of!(AttachReq, flags) == 12);
    assert!(offset_of!(AttachReq, reserved) == 16);

    assert!(size_of::<DetachReq>() == 20);
    assert!(offset_of!(DetachReq, domain) == 4);
    assert!(offset_of!(DetachReq, endpoint) == 8);
    assert!(offset_of!(DetachReq, reserved) == 12);

    assert!(size_of::<MapReq>() == 36);
    assert!(offset_of!(MapReq, domain) == 4);
    assert!(offset_of!(MapReq, virt_start) == 8);
    assert!(offset_of!(MapReq, virt_end) == 16);
    assert!(offset_of!(MapReq, phys_start) == 24);
    assert!(offset_of!(MapReq, flags) == 32);

    assert!(size_of::<UnmapReq>() == 28);
    assert!(offset_of!(UnmapReq, domain) == 4);
    assert!(offset_of!(UnmapReq, virt_start) == 8);
    assert!(offset_of!(UnmapReq, virt_end) == 16);
    assert!(offset_of!(UnmapReq, reserved) == 24);

    assert!(size_of::<ProbeReq>() == 72);
    assert!(offset_of!(ProbeReq, endpoint) == 4);
    assert!(offset_of!(ProbeReq, reserved) == 8);

    assert!(size_of::<ConfigWire>() == 40);
    assert!(offset_of!(ConfigWire, page_size_mask) == 0x00);
    assert!(offset_of!(ConfigWire, input_start) == 0x08);
    assert!(offset_of!(ConfigWire, input_end) == 0x10);
    assert!(offset_of!(ConfigWire, domain_start) == 0x18);
    assert!(offset_of!(ConfigWire, domain_end) == 0x1c);
    assert!(offset_of!(ConfigWire, probe_size) == 0x20);
    assert!(offset_of!(ConfigWire, bypass) == 0x24);
    assert!(offset_of!(ConfigWire, reserved) == 0x25);

    assert!(size_of::<PropertyHead>() == 4);
    assert!(size_of::<ResvMemProp>() == 24);
    assert!(offset_of!(ResvMemProp, subtype) == 4);
    assert!(offset_of!(ResvMemProp, reserved) == 5);
    assert!(offset_of!(ResvMemProp, start) == 8);
    assert!(offset_of!(ResvMemProp, end) == 16);

    assert!(size_of::<FaultWire>() == 24);
    assert!(offset_of!(FaultWire, flags) == 4);
    assert!(offset_of!(FaultWire, endpoint) == 8);
    assert!(offset_of!(FaultWire, reserved1) == 12);
    assert!(offset_of!(FaultWire, address) == 16);
};
