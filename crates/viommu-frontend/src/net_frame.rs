//! What the traffic generator puts on the wire and how a receiver checks
//! it: the `virtio_net_hdr`, test frames that name their source and
//! sequence number and carry a pattern derived from both, and the
//! reassembly of packets that span several receive buffers (MRG_RXBUF).
//!
//! A test frame: destination MAC, source MAC, ethertype 0x88b5 (local
//! experimental), then, in network byte order, the magic 0x76696f6d
//! ("viom"), the source number (u32), the sequence number (u64), and
//! [`pattern`] bytes up to the frame's length.

use crate::net::NET_HDR_LEN;

/// The test frames' ethertype (IEEE local experimental 1).
pub const ETHERTYPE: u16 = 0x88b5;
/// The magic after the Ethernet header ("viom").
pub const MAGIC: u32 = 0x7669_6f6d;
/// The broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Shortest Ethernet frame (without FCS) the generator sends.
pub const MIN_FRAME_LEN: usize = 60;
/// Longest frame the generator sends.
pub const MAX_FRAME_LEN: usize = 65_535;
/// Ethernet header bytes.
const ETH_LEN: usize = 14;
/// Bytes before the pattern: Ethernet header, magic, source, sequence.
pub const TEST_HEADER_LEN: usize = ETH_LEN + 4 + 4 + 8;

/// `struct virtio_net_hdr` as VERSION_1 lays it out (12 bytes, little
/// endian, `num_buffers` included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Header length for GSO.
    pub hdr_len: u16,
    /// GSO segment size.
    pub gso_size: u16,
    /// Checksum start.
    pub csum_start: u16,
    /// Checksum offset from `csum_start`.
    pub csum_offset: u16,
    /// Buffers the packet spans (receive; 1 without MRG_RXBUF).
    pub num_buffers: u16,
}

impl NetHdr {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Decodes a header; `None` if `b` is shorter than one.
    pub fn from_bytes(b: &[u8]) -> Option<NetHdr> {
        let b = b.get(..NET_HDR_LEN)?;
        let u = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Some(NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        })
    }
}

/// The bytes after the test header of frame `seq` from `source`.
pub fn pattern(source: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = (u64::from(source) << 32 | 0x5bd1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ seq.wrapping_mul(0xbf58_476d_1ce4_e5b9)
        ^ 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Test frame `seq` from `source`, `len` bytes (at least
/// [`TEST_HEADER_LEN`]) of Ethernet frame.
pub fn build_frame(dst: [u8; 6], src: [u8; 6], source: u32, seq: u64, len: usize) -> Vec<u8> {
    let len = len.max(TEST_HEADER_LEN);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&MAGIC.to_be_bytes());
    f.extend_from_slice(&source.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&pattern(source, seq, len - TEST_HEADER_LEN));
    f
}

/// What a received frame turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameCheck {
    /// A test frame, intact.
    Good {
        /// Its source number.
        source: u32,
        /// Its sequence number.
        seq: u64,
    },
    /// Addressed neither to this MAC nor to broadcast.
    Foreign,
    /// Too short for a test frame, or not one (ethertype, magic).
    BadHeader,
    /// A test frame whose length or pattern is wrong.
    Corrupt {
        /// The source number it names.
        source: u32,
        /// The sequence number it names.
        seq: u64,
    },
}

/// Checks a received frame for the receiver at `mac`; `expected_len`
/// gives each source's frame length (`None`: any length is right).
pub fn check_frame(
    frame: &[u8],
    mac: [u8; 6],
    expected_len: impl Fn(u32) -> Option<usize>,
) -> FrameCheck {
    let Some(dst) = frame.get(..6) else {
        return FrameCheck::BadHeader;
    };
    if dst != mac && dst != BROADCAST {
        return FrameCheck::Foreign;
    }
    if frame.len() < TEST_HEADER_LEN
        || frame[12..14] != ETHERTYPE.to_be_bytes()
        || frame[14..18] != MAGIC.to_be_bytes()
    {
        return FrameCheck::BadHeader;
    }
    let source = u32::from_be_bytes([frame[18], frame[19], frame[20], frame[21]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&frame[22..30]);
    let seq = u64::from_be_bytes(s);
    let len_ok = expected_len(source).is_none_or(|l| l == frame.len());
    if len_ok && frame[TEST_HEADER_LEN..] == pattern(source, seq, frame.len() - TEST_HEADER_LEN) {
        FrameCheck::Good { source, seq }
    } else {
        FrameCheck::Corrupt { source, seq }
    }
}

/// What the reassembler made of one used receive buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RxEvent {
    /// More buffers of this packet are to come.
    Partial,
    /// A whole packet: its Ethernet frame.
    Packet(Vec<u8>),
    /// A buffer too short for the header: dropped.
    ShortBuffer,
    /// A header's `num_buffers` is wrong: 0 with MRG_RXBUF (the packet is
    /// dropped), or not 1 without it (counted only, as Linux ignores it).
    BadNumBuffers {
        /// The value.
        num_buffers: u16,
        /// The frame, if it was kept (without MRG_RXBUF).
        frame: Option<Vec<u8>>,
    },
}

/// Puts packets back together from used receive buffers taken in
/// used-ring order: without MRG_RXBUF each buffer is header plus frame;
/// with it, the first buffer's header says how many buffers the packet
/// spans and the frame continues in the next ones.
#[derive(Debug, Default)]
pub struct RxAssembler {
    mrg: bool,
    frame: Vec<u8>,
    /// Buffers still to come for `frame`.
    remaining: u16,
}

impl RxAssembler {
    /// A reassembler for a device with (`mrg`) or without MRG_RXBUF.
    pub fn new(mrg: bool) -> RxAssembler {
        RxAssembler {
            mrg,
            frame: Vec::new(),
            remaining: 0,
        }
    }

    /// Whether a packet is half received.
    pub fn in_progress(&self) -> bool {
        self.remaining > 0
    }

    /// Takes the bytes the device wrote into one buffer (its used length
    /// of them).
    pub fn push(&mut self, bytes: &[u8]) -> RxEvent {
        if self.remaining > 0 {
            self.frame.extend_from_slice(bytes);
            self.remaining -= 1;
            return if self.remaining == 0 {
                RxEvent::Packet(std::mem::take(&mut self.frame))
            } else {
                RxEvent::Partial
            };
        }
        let Some(hdr) = NetHdr::from_bytes(bytes) else {
            return RxEvent::ShortBuffer;
        };
        let body = bytes[NET_HDR_LEN..].to_vec();
        if !self.mrg {
            return if hdr.num_buffers == 1 {
                RxEvent::Packet(body)
            } else {
                RxEvent::BadNumBuffers {
                    num_buffers: hdr.num_buffers,
                    frame: Some(body),
                }
            };
        }
        match hdr.num_buffers {
            0 => RxEvent::BadNumBuffers {
                num_buffers: 0,
                frame: None,
            },
            1 => RxEvent::Packet(body),
            n => {
                self.frame = body;
                self.remaining = n - 1;
                RxEvent::Partial
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    #[test]
    fn frames_round_trip_and_name_source_and_sequence() {
        let f = build_frame(B, A, 7, 42, 64);
        assert_eq!(f.len(), 64);
        assert_eq!(&f[..6], &B);
        assert_eq!(&f[6..12], &A);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(&f[14..18], b"viom");
        assert_eq!(
            check_frame(&f, B, |_| Some(64)),
            FrameCheck::Good { source: 7, seq: 42 }
        );
        let bc = build_frame(BROADCAST, A, 7, 1, 1500);
        assert_eq!(
            check_frame(&bc, B, |_| None),
            FrameCheck::Good { source: 7, seq: 1 }
        );
        assert_ne!(pattern(7, 1, 64), pattern(7, 2, 64));
        assert_ne!(pattern(7, 1, 64), pattern(8, 1, 64));
    }

    #[test]
    fn damage_is_detected() {
        let f = build_frame(B, A, 7, 42, 128);
        let mut flipped = f.clone();
        flipped[100] ^= 1;
        assert_eq!(
            check_frame(&flipped, B, |_| None),
            FrameCheck::Corrupt { source: 7, seq: 42 }
        );
        let mut seq = f.clone();
        seq[29] ^= 1;
        assert!(matches!(
            check_frame(&seq, B, |_| None),
            FrameCheck::Corrupt { .. }
        ));
        assert_eq!(
            check_frame(&f[..100], B, |_| Some(128)),
            FrameCheck::Corrupt { source: 7, seq: 42 },
            "truncated"
        );
        assert_eq!(check_frame(&f, A, |_| None), FrameCheck::Foreign);
        assert_eq!(check_frame(&f[..20], B, |_| None), FrameCheck::BadHeader);
        assert_eq!(check_frame(&f[..3], B, |_| None), FrameCheck::BadHeader);
        let mut magic = f.clone();
        magic[15] = 0;
        assert_eq!(check_frame(&magic, B, |_| None), FrameCheck::BadHeader);
    }

    #[test]
    fn header_round_trips() {
        let h = NetHdr {
            flags: 1,
            gso_type: 2,
            hdr_len: 3,
            gso_size: 4,
            csum_start: 5,
            csum_offset: 6,
            num_buffers: 0x0102,
        };
        let b = h.to_bytes();
        assert_eq!(&b[10..], &[0x02, 0x01]);
        assert_eq!(NetHdr::from_bytes(&b), Some(h));
        assert_eq!(NetHdr::from_bytes(&b[..11]), None);
    }

    fn buffer(num_buffers: u16, body: &[u8]) -> Vec<u8> {
        let mut b = NetHdr {
            num_buffers,
            ..NetHdr::default()
        }
        .to_bytes()
        .to_vec();
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn mergeable_buffers_are_joined_in_used_order() {
        let frame = build_frame(B, A, 1, 9, 3000);
        let mut r = RxAssembler::new(true);
        // 1536-byte buffers: 1524 bytes of frame in the first, 1476 next.
        assert_eq!(r.push(&buffer(2, &frame[..1524])), RxEvent::Partial);
        assert!(r.in_progress());
        assert_eq!(r.push(&frame[1524..]), RxEvent::Packet(frame.clone()));
        assert!(!r.in_progress());
        // Three buffers.
        assert_eq!(r.push(&buffer(3, &frame[..1000])), RxEvent::Partial);
        assert_eq!(r.push(&frame[1000..2000]), RxEvent::Partial);
        assert_eq!(r.push(&frame[2000..]), RxEvent::Packet(frame.clone()));
        // One buffer, then num_buffers 0 and a short buffer.
        let small = build_frame(B, A, 1, 10, 60);
        assert_eq!(r.push(&buffer(1, &small)), RxEvent::Packet(small.clone()));
        assert_eq!(
            r.push(&buffer(0, &small)),
            RxEvent::BadNumBuffers {
                num_buffers: 0,
                frame: None
            }
        );
        assert_eq!(r.push(&[0; 5]), RxEvent::ShortBuffer);
    }

    #[test]
    fn without_mergeable_buffers_each_buffer_is_a_packet() {
        let frame = build_frame(B, A, 1, 9, 60);
        let mut r = RxAssembler::new(false);
        assert_eq!(r.push(&buffer(1, &frame)), RxEvent::Packet(frame.clone()));
        assert_eq!(
            r.push(&buffer(2, &frame)),
            RxEvent::BadNumBuffers {
                num_buffers: 2,
                frame: Some(frame.clone())
            },
            "num_buffers must be 1; the frame is still taken"
        );
        assert!(!r.in_progress());
    }
}
