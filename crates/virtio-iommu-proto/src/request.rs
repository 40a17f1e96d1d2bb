//! Requests on the request queue: types, typed values, and the parser.

use crate::status::Status;
use crate::wire::{AttachReq, DetachReq, MapReq, ProbeReq, ReqHead, ReqTail, UnmapReq};
use zerocopy::{FromBytes, IntoBytes};

/// `VIRTIO_IOMMU_ATTACH_F_BYPASS`: the domain is a bypass (identity) domain.
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1 << 0;
/// Every ATTACH flag the spec defines.
pub const ATTACH_FLAGS_KNOWN: u32 = VIRTIO_IOMMU_ATTACH_F_BYPASS;

/// Size of the request head.
pub const HEAD_LEN: usize = core::mem::size_of::<ReqHead>();
/// Size of the request tail.
pub const TAIL_LEN: usize = core::mem::size_of::<ReqTail>();
/// The longest readable part the device ever needs (PROBE).
pub const MAX_READABLE_LEN: usize = core::mem::size_of::<ProbeReq>();

/// `VIRTIO_IOMMU_T_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RequestType {
    /// Attach an endpoint to a domain.
    Attach = 1,
    /// Detach an endpoint from a domain.
    Detach = 2,
    /// Map an IOVA range.
    Map = 3,
    /// Unmap an IOVA range.
    Unmap = 4,
    /// Read an endpoint's properties.
    Probe = 5,
}

impl RequestType {
    /// The type for a head byte, if the spec defines it. Types 6 and up are
    /// claimed by conflicting unmerged proposals and are treated as unknown.
    pub const fn from_u8(v: u8) -> Option<RequestType> {
        Some(match v {
            1 => RequestType::Attach,
            2 => RequestType::Detach,
            3 => RequestType::Map,
            4 => RequestType::Unmap,
            5 => RequestType::Probe,
            _ => return None,
        })
    }

    /// Size of the device-readable part, head included.
    pub const fn readable_len(self) -> usize {
        match self {
            RequestType::Attach => core::mem::size_of::<AttachReq>(),
            RequestType::Detach => core::mem::size_of::<DetachReq>(),
            RequestType::Map => core::mem::size_of::<MapReq>(),
            RequestType::Unmap => core::mem::size_of::<UnmapReq>(),
            RequestType::Probe => core::mem::size_of::<ProbeReq>(),
        }
    }

    /// The spec's name, for logs.
    pub const fn name(self) -> &'static str {
        match self {
            RequestType::Attach => "ATTACH",
            RequestType::Detach => "DETACH",
            RequestType::Map => "MAP",
            RequestType::Unmap => "UNMAP",
            RequestType::Probe => "PROBE",
        }
    }
}

/// `VIRTIO_IOMMU_MAP_F_*` flags of a MAP request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MapFlags(pub u32);

impl MapFlags {
    /// Reads are allowed.
    pub const READ: MapFlags = MapFlags(1 << 0);
    /// Writes are allowed.
    pub const WRITE: MapFlags = MapFlags(1 << 1);
    /// Device memory (needs `VIRTIO_IOMMU_F_MMIO`).
    pub const MMIO: MapFlags = MapFlags(1 << 2);
    /// Every flag the spec defines (the header's `VIRTIO_IOMMU_MAP_F_MASK`).
    pub const KNOWN: MapFlags = MapFlags(0x7);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: MapFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits outside the spec's flags.
    pub const fn unknown_bits(self) -> u32 {
        self.0 & !Self::KNOWN.0
    }

    /// Union of both sets.
    pub const fn union(self, other: MapFlags) -> MapFlags {
        MapFlags(self.0 | other.0)
    }
}

/// A parsed ATTACH request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attach {
    /// Domain ID.
    pub domain: u32,
    /// Endpoint ID.
    pub endpoint: u32,
    /// Raw flags (`VIRTIO_IOMMU_ATTACH_F_*`), unknown bits included.
    pub flags: u32,
    /// Raw reserved bytes (the device must reject non-zero).
    pub reserved: [u8; 4],
}

/// A parsed DETACH request (its reserved bytes are ignored by rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detach {
    /// Domain ID.
    pub domain: u32,
    /// Endpoint ID.
    pub endpoint: u32,
}

/// A parsed MAP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Map {
    /// Domain ID.
    pub domain: u32,
    /// First IOVA.
    pub virt_start: u64,
    /// Last IOVA, inclusive.
    pub virt_end: u64,
    /// Guest-physical address of `virt_start`.
    pub phys_start: u64,
    /// Raw flags, unknown bits included.
    pub flags: MapFlags,
}

/// A parsed UNMAP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmap {
    /// Domain ID.
    pub domain: u32,
    /// First IOVA.
    pub virt_start: u64,
    /// Last IOVA, inclusive.
    pub virt_end: u64,
    /// Raw reserved bytes.
    pub reserved: [u8; 4],
}

/// A parsed PROBE request (its 64 reserved bytes are ignored by rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Endpoint ID.
    pub endpoint: u32,
}

/// A request, typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// ATTACH.
    Attach(Attach),
    /// DETACH.
    Detach(Detach),
    /// MAP.
    Map(Map),
    /// UNMAP.
    Unmap(Unmap),
    /// PROBE.
    Probe(Probe),
}

/// Why the readable bytes of a request are not a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer than 4 readable bytes: there is no head to read.
    #[error("readable part is {len} bytes, too short for the 4-byte request head")]
    NoHead {
        /// Readable bytes available.
        len: usize,
    },
    /// The head names a type the spec does not define.
    #[error("unknown request type {0}")]
    UnknownType(u8),
    /// The head is readable but the type-specific fields are cut short.
    #[error("{} request has {got} readable bytes, needs {need}", req_type.name())]
    TooShort {
        /// The request's type.
        req_type: RequestType,
        /// Bytes the type needs.
        need: usize,
        /// Bytes the driver provided.
        got: usize,
    },
}

impl ParseError {
    /// The status to answer with when the tail can still be written, or
    /// `None` when the spec wants the buffers returned untouched (used
    /// length 0): no head, or a type the device does not know (DEV-OPS-2).
    pub const fn status(self) -> Option<Status> {
        match self {
            ParseError::NoHead { .. } | ParseError::UnknownType(_) => None,
            ParseError::TooShort { .. } => Some(Status::Inval),
        }
    }
}

/// Reads a struct from the front of `bytes`, or reports how short it is.
fn read_prefix<T: FromBytes>(req_type: RequestType, bytes: &[u8]) -> Result<T, ParseError> {
    match T::read_from_prefix(bytes) {
        Ok((value, _rest)) => Ok(value),
        Err(_) => Err(ParseError::TooShort {
            req_type,
            need: req_type.readable_len(),
            got: bytes.len(),
        }),
    }
}

/// Parses the device-readable part of a request.
///
/// `readable` is the readable bytes of the chain concatenated in order (the
/// caller gathers them from however many descriptors the driver used; it
/// needs at most [`MAX_READABLE_LEN`] of them). Bytes past the type's fields
/// are ignored.
pub fn parse_request(readable: &[u8]) -> Result<Request, ParseError> {
    let head = ReqHead::read_from_prefix(readable)
        .map_err(|_| ParseError::NoHead {
            len: readable.len(),
        })?
        .0;
    let req_type =
        RequestType::from_u8(head.req_type).ok_or(ParseError::UnknownType(head.req_type))?;
    Ok(match req_type {
        RequestType::Attach => {
            let r: AttachReq = read_prefix(req_type, readable)?;
            Request::Attach(Attach {
                domain: r.domain.get(),
                endpoint: r.endpoint.get(),
                flags: r.flags.get(),
                reserved: r.reserved,
            })
        }
        RequestType::Detach => {
            let r: DetachReq = read_prefix(req_type, readable)?;
            Request::Detach(Detach {
                domain: r.domain.get(),
                endpoint: r.endpoint.get(),
            })
        }
        RequestType::Map => {
            let r: MapReq = read_prefix(req_type, readable)?;
            Request::Map(Map {
                domain: r.domain.get(),
                virt_start: r.virt_start.get(),
                virt_end: r.virt_end.get(),
                phys_start: r.phys_start.get(),
                flags: MapFlags(r.flags.get()),
            })
        }
        RequestType::Unmap => {
            let r: UnmapReq = read_prefix(req_type, readable)?;
            Request::Unmap(Unmap {
                domain: r.domain.get(),
                virt_start: r.virt_start.get(),
                virt_end: r.virt_end.get(),
                reserved: r.reserved,
            })
        }
        RequestType::Probe => {
            let r: ProbeReq = read_prefix(req_type, readable)?;
            Request::Probe(Probe {
                endpoint: r.endpoint.get(),
            })
        }
    })
}

impl Request {
    /// The request's type.
    pub const fn req_type(&self) -> RequestType {
        match self {
            Request::Attach(_) => RequestType::Attach,
            Request::Detach(_) => RequestType::Detach,
            Request::Map(_) => RequestType::Map,
            Request::Unmap(_) => RequestType::Unmap,
            Request::Probe(_) => RequestType::Probe,
        }
    }

    /// Encodes the device-readable part as a driver would (head reserved
    /// bytes zero, DETACH/PROBE reserved bytes zero). Used by test drivers.
    pub fn encode(&self) -> Vec<u8> {
        let head = ReqHead {
            req_type: self.req_type() as u8,
            reserved: [0; 3],
        };
        match *self {
            Request::Attach(a) => AttachReq {
                head,
                domain: a.domain.into(),
                endpoint: a.endpoint.into(),
                flags: a.flags.into(),
                reserved: a.reserved,
            }
            .as_bytes()
            .to_vec(),
            Request::Detach(d) => DetachReq {
                head,
                domain: d.domain.into(),
                endpoint: d.endpoint.into(),
                reserved: [0; 8],
            }
            .as_bytes()
            .to_vec(),
            Request::Map(m) => MapReq {
                head,
                domain: m.domain.into(),
                virt_start: m.virt_start.into(),
                virt_end: m.virt_end.into(),
                phys_start: m.phys_start.into(),
                flags: m.flags.0.into(),
            }
            .as_bytes()
            .to_vec(),
            Request::Unmap(u) => UnmapReq {
                head,
                domain: u.domain.into(),
                virt_start: u.virt_start.into(),
                virt_end: u.virt_end.into(),
                reserved: u.reserved,
            }
            .as_bytes()
            .to_vec(),
            Request::Probe(p) => ProbeReq {
                head,
                endpoint: p.endpoint.into(),
                reserved: [0; 64],
            }
            .as_bytes()
            .to_vec(),
        }
    }
}

/// The 4 tail bytes for `status`: status then three zero bytes (DEV-OPS-4).
pub const fn encode_tail(status: Status) -> [u8; TAIL_LEN] {
    [status as u8, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_requests() -> [Request; 5] {
        [
            Request::Attach(Attach {
                domain: 7,
                endpoint: 0x20,
                flags: 1,
                reserved: [0; 4],
            }),
            Request::Detach(Detach {
                domain: 0xffff_ffff,
                endpoint: 3,
            }),
            Request::Map(Map {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0xffff_ffff_ffff_ffff,
                phys_start: 0x8000_0000,
                flags: MapFlags(3),
            }),
            Request::Unmap(Unmap {
                domain: 2,
                virt_start: 0,
                virt_end: 0x1fff,
                reserved: [0, 0, 0, 1],
            }),
            Request::Probe(Probe { endpoint: 9 }),
        ]
    }

    #[test]
    fn encode_then_parse_round_trips() {
        for req in sample_requests() {
            let bytes = req.encode();
            assert_eq!(bytes.len(), req.req_type().readable_len());
            assert_eq!(parse_request(&bytes), Ok(req));
        }
    }

    #[test]
    fn map_fields_sit_at_spec_offsets_little_endian() {
        let mut b = [0u8; 36];
        b[0] = 3;
        b[4..8].copy_from_slice(&0x0403_0201u32.to_le_bytes());
        b[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        b[16..24].copy_from_slice(&0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        b[24..32].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        b[32..36].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(
            parse_request(&b),
            Ok(Request::Map(Map {
                domain: 0x0403_0201,
                virt_start: 0x1122_3344_5566_7788,
                virt_end: 0x99aa_bbcc_ddee_ff00,
                phys_start: 0x0102_0304_0506_0708,
                flags: MapFlags(5),
            }))
        );
    }

    #[test]
    fn head_reserved_and_trailing_bytes_are_ignored() {
        for req in sample_requests() {
            let mut bytes = req.encode();
            bytes[1..4].copy_from_slice(&[0xff; 3]);
            bytes.extend_from_slice(&[0xee; 16]);
            assert_eq!(parse_request(&bytes), Ok(req));
        }
    }

    #[test]
    fn missing_head_and_unknown_types_are_unparseable() {
        for len in 0..4 {
            let e = parse_request(&[1u8; 4][..len]).unwrap_err();
            assert_eq!(e, ParseError::NoHead { len });
            assert_eq!(e.status(), None);
        }
        for t in [0u8, 6, 7, 8, 0x80, 0xff] {
            let e = parse_request(&[t, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
            assert_eq!(e, ParseError::UnknownType(t));
            assert_eq!(e.status(), None);
        }
    }

    #[test]
    fn every_truncation_is_too_short_with_inval() {
        for req in sample_requests() {
            let bytes = req.encode();
            for len in 4..bytes.len() {
                let e = parse_request(&bytes[..len]).unwrap_err();
                assert_eq!(
                    e,
                    ParseError::TooShort {
                        req_type: req.req_type(),
                        need: bytes.len(),
                        got: len
                    }
                );
                assert_eq!(e.status(), Some(Status::Inval));
            }
        }
    }

    #[test]
    fn tail_reserved_bytes_are_zero() {
        assert_eq!(encode_tail(Status::Range), [5, 0, 0, 0]);
    }

    #[test]
    fn map_flag_helpers() {
        let f = MapFlags::READ.union(MapFlags::WRITE);
        assert!(f.contains(MapFlags::READ));
        assert!(!f.contains(MapFlags::MMIO));
        assert_eq!(MapFlags(0x8000_000f).unknown_bits(), 0x8000_0008);
    }
}
