//! What the transport writes back for one request.

use virtio_iommu_proto::Status;
use virtio_iommu_proto::request::{RequestType, TAIL_LEN, encode_tail};

/// The device's answer to one descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// The request could not be parsed (no room for a tail, no head, an
    /// unknown type, or PROBE without `F_PROBE`): write nothing and return
    /// the chain with used length 0 (DEV-OPS-2, DEV-OPS-6, DEV-PROBE-3).
    Unparsed,
    /// Write `area` at writable offset 0 and the tail right after it; the
    /// used length is `area.len() + 4`. `area` is empty except for PROBE,
    /// where it is the properties area (or zeros, AMB-3).
    Complete {
        /// The request type, when the head could be read.
        req_type: RequestType,
        /// The status for the tail.
        status: Status,
        /// Bytes before the tail.
        area: &'a [u8],
    },
}

impl Reply<'_> {
    /// The used length to report.
    pub fn used_len(&self) -> u32 {
        match self {
            Reply::Unparsed => 0,
            // The area never exceeds MAX_PROBE_SIZE, so this cannot truncate.
            Reply::Complete { area, .. } => (area.len() + TAIL_LEN) as u32,
        }
    }

    /// The status, if a tail is written.
    pub fn status(&self) -> Option<Status> {
        match self {
            Reply::Unparsed => None,
            Reply::Complete { status, .. } => Some(*status),
        }
    }

    /// The tail bytes and their writable offset, if a tail is written.
    pub fn tail(&self) -> Option<(usize, [u8; TAIL_LEN])> {
        match self {
            Reply::Unparsed => None,
            Reply::Complete { status, area, .. } => Some((area.len(), encode_tail(*status))),
        }
    }

    /// The whole device-written prefix of the writable part (area + tail),
    /// for transports that write it in one go.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Reply::Unparsed => Vec::new(),
            Reply::Complete { status, area, .. } => {
                let mut v = Vec::with_capacity(area.len() + TAIL_LEN);
                v.extend_from_slice(area);
                v.extend_from_slice(&encode_tail(*status));
                v
            }
        }
    }
}
