//! The range list of DISCARD and WRITE_ZEROES requests
//! (`struct virtio_blk_discard_write_zeroes`, virtio 1.2 §5.2.6).
//!
//! Statuses chosen, after §5.2.6.1/§5.2.6.2:
//!
//! * A flag the request does not define is UNSUPP (device MUST). For
//!   DISCARD that is every flag, the unmap bit included (device MUST:
//!   "UNSUPP for discard commands if the unmap flag is set"); WRITE_ZEROES
//!   defines only bit 0, unmap. Flags of all segments are checked before
//!   anything else, so a bad flag anywhere answers UNSUPP whatever else is
//!   wrong.
//! * What the driver MUST NOT send — data that is not a non-zero multiple
//!   of 16 bytes, more segments than `max_*_seg`, more sectors in a segment
//!   than `max_*_sectors` — is a driver error: IOERR. So is a range past
//!   the capacity, or not aligned to the logical block (the alignment the
//!   config space advertises).
//! * A segment of 0 sectors (in range and aligned) is accepted and does
//!   nothing.

use crate::disk::DiskInfo;
use crate::limits::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
};
use crate::request::Status;

/// Bytes of one segment descriptor.
pub const SEGMENT_LEN: usize = 16;
/// Flag bit 0: WRITE_ZEROES may deallocate the range.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// One range of a DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First 512-byte sector.
    pub sector: u64,
    /// Number of 512-byte sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap; the others are reserved.
    pub flags: u32,
}

impl DiscardSegment {
    /// Parses one 16-byte little-endian descriptor.
    pub fn from_bytes(bytes: &[u8; SEGMENT_LEN]) -> Self {
        let [
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            n0,
            n1,
            n2,
            n3,
            f0,
            f1,
            f2,
            f3,
        ] = *bytes;
        DiscardSegment {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }

    /// Whether the unmap flag is set.
    pub const fn unmap(&self) -> bool {
        self.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
    }
}

/// The requests that carry a segment list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentOp {
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
}

impl SegmentOp {
    /// Most segments in one request (`max_discard_seg`,
    /// `max_write_zeroes_seg`).
    pub const fn max_segments(self) -> u32 {
        match self {
            SegmentOp::Discard => MAX_DISCARD_SEG,
            SegmentOp::WriteZeroes => MAX_WRITE_ZEROES_SEG,
        }
    }

    /// Most sectors in one segment (`max_discard_sectors`,
    /// `max_write_zeroes_sectors`).
    pub const fn max_sectors(self) -> u32 {
        match self {
            SegmentOp::Discard => MAX_DISCARD_SECTORS,
            SegmentOp::WriteZeroes => MAX_WRITE_ZEROES_SECTORS,
        }
    }

    /// The flags the request defines.
    const fn known_flags(self) -> u32 {
        match self {
            SegmentOp::Discard => 0,
            SegmentOp::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        }
    }
}

/// How many segments `data_len` bytes of segment list hold: IOERR unless
/// that is a non-zero multiple of 16 bytes and at most `max_segments`.
pub fn segment_count(data_len: u64, max_segments: u32) -> Result<usize, Status> {
    let segment_len = SEGMENT_LEN as u64;
    if data_len == 0 || data_len % segment_len != 0 {
        return Err(Status::IoErr);
    }
    let count = data_len / segment_len;
    if count > u64::from(max_segments) {
        return Err(Status::IoErr);
    }
    usize::try_from(count).map_err(|_| Status::IoErr)
}

/// Parses the segment list (the request's readable data); see
/// [`segment_count`] for what is refused.
pub fn parse_segments(bytes: &[u8], max_segments: u32) -> Result<Vec<DiscardSegment>, Status> {
    segment_count(bytes.len() as u64, max_segments)?;
    Ok(bytes
        .chunks_exact(SEGMENT_LEN)
        .map(|chunk| {
            let mut descriptor = [0; SEGMENT_LEN];
            descriptor.copy_from_slice(chunk);
            DiscardSegment::from_bytes(&descriptor)
        })
        .collect())
}

/// Checks parsed segments against the request's flags, the per-segment
/// sector limit, the logical block alignment and the capacity (statuses
/// in the module documentation).
pub fn check_segments(
    segments: &[DiscardSegment],
    disk: &DiskInfo,
    op: SegmentOp,
) -> Result<(), Status> {
    if segments.iter().any(|s| s.flags & !op.known_flags() != 0) {
        return Err(Status::Unsupp);
    }
    let per_block = u64::from(disk.sectors_per_block());
    for segment in segments {
        if segment.num_sectors > op.max_sectors() {
            return Err(Status::IoErr);
        }
        let sectors = u64::from(segment.num_sectors);
        if segment.sector % per_block != 0 || sectors % per_block != 0 {
            return Err(Status::IoErr);
        }
        match segment.sector.checked_add(sectors) {
            Some(end) if end <= disk.capacity_sectors => {}
            _ => return Err(Status::IoErr),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(segments: &[DiscardSegment]) -> Vec<u8> {
        segments
            .iter()
            .flat_map(|s| {
                let mut bytes = s.sector.to_le_bytes().to_vec();
                bytes.extend_from_slice(&s.num_sectors.to_le_bytes());
                bytes.extend_from_slice(&s.flags.to_le_bytes());
                bytes
            })
            .collect()
    }

    fn seg(sector: u64, num_sectors: u32, flags: u32) -> DiscardSegment {
        DiscardSegment {
            sector,
            num_sectors,
            flags,
        }
    }

    fn disk_4k(capacity_sectors: u64) -> DiskInfo {
        DiskInfo {
            logical_block_size: 4096,
            physical_block_size: 4096,
            discard: true,
            write_zeroes: true,
            ..DiskInfo::new(capacity_sectors)
        }
    }

    #[test]
    fn segment_fields_are_little_endian_at_0_8_and_12() {
        let bytes: [u8; SEGMENT_LEN] = std::array::from_fn(|i| i as u8 + 1);
        assert_eq!(
            DiscardSegment::from_bytes(&bytes),
            seg(0x0807_0605_0403_0201, 0x0c0b_0a09, 0x100f_0e0d)
        );
    }

    #[test]
    fn parses_every_segment_in_order() {
        let segments = [
            seg(0, 8, 0),
            seg(u64::MAX, u32::MAX, 1),
            seg(64, 16, 0xffff_fffe),
        ];
        assert_eq!(parse_segments(&encode(&segments), 3), Ok(segments.to_vec()));
    }

    #[test]
    fn empty_segment_list_is_an_io_error() {
        assert_eq!(parse_segments(&[], 256), Err(Status::IoErr));
    }

    #[test]
    fn length_not_a_multiple_of_16_is_an_io_error() {
        for len in [1, 15, 17, 31, 33] {
            assert_eq!(
                parse_segments(&vec![0; len], 256),
                Err(Status::IoErr),
                "{len}"
            );
        }
    }

    #[test]
    fn more_segments_than_the_maximum_is_an_io_error() {
        let two = encode(&[seg(0, 8, 0), seg(8, 8, 0)]);
        assert_eq!(parse_segments(&two, 1), Err(Status::IoErr));
        assert_eq!(parse_segments(&two, 0), Err(Status::IoErr));
        assert_eq!(parse_segments(&two, 2).map(|s| s.len()), Ok(2));
    }

    #[test]
    fn segment_count_refuses_what_parse_segments_refuses() {
        assert_eq!(segment_count(0, 4), Err(Status::IoErr));
        assert_eq!(segment_count(24, 4), Err(Status::IoErr));
        assert_eq!(segment_count(80, 4), Err(Status::IoErr));
        assert_eq!(segment_count(64, 4), Ok(4));
        assert_eq!(segment_count(u64::MAX - 15, u32::MAX), Err(Status::IoErr));
    }

    #[test]
    fn aligned_in_range_segments_pass() {
        let disk = disk_4k(1024);
        let segments = [seg(0, 8, 0), seg(1016, 8, 0), seg(8, 0, 0)];
        assert_eq!(check_segments(&segments, &disk, SegmentOp::Discard), Ok(()));
        let zeroes = [seg(0, 1024, 1), seg(8, 8, 0)];
        assert_eq!(
            check_segments(&zeroes, &disk, SegmentOp::WriteZeroes),
            Ok(())
        );
    }

    #[test]
    fn discard_with_the_unmap_flag_is_unsupported() {
        let disk = disk_4k(1024);
        assert_eq!(
            check_segments(&[seg(0, 8, 1)], &disk, SegmentOp::Discard),
            Err(Status::Unsupp)
        );
    }

    #[test]
    fn reserved_flags_are_unsupported_for_both_requests() {
        let disk = disk_4k(1024);
        for op in [SegmentOp::Discard, SegmentOp::WriteZeroes] {
            for flags in [2, 0x8000_0000, 0xffff_ffff] {
                assert_eq!(
                    check_segments(&[seg(0, 8, flags)], &disk, op),
                    Err(Status::Unsupp),
                    "{op:?} {flags:#x}"
                );
            }
        }
    }

    #[test]
    fn a_bad_flag_anywhere_wins_over_a_bad_range() {
        let disk = disk_4k(1024);
        let segments = [seg(u64::MAX, 8, 0), seg(0, 8, 4)];
        assert_eq!(
            check_segments(&segments, &disk, SegmentOp::WriteZeroes),
            Err(Status::Unsupp)
        );
    }

    #[test]
    fn range_past_the_capacity_is_an_io_error() {
        let disk = disk_4k(1024);
        for segment in [seg(1024, 8, 0), seg(1016, 16, 0), seg(u64::MAX - 7, 8, 0)] {
            for op in [SegmentOp::Discard, SegmentOp::WriteZeroes] {
                assert_eq!(
                    check_segments(&[seg(0, 8, 0), segment], &disk, op),
                    Err(Status::IoErr),
                    "{segment:?}"
                );
            }
        }
    }

    #[test]
    fn range_not_aligned_to_the_logical_block_is_an_io_error() {
        let disk = disk_4k(1024);
        for segment in [seg(1, 8, 0), seg(0, 7, 0), seg(4, 4, 0)] {
            assert_eq!(
                check_segments(&[segment], &disk, SegmentOp::Discard),
                Err(Status::IoErr),
                "{segment:?}"
            );
        }
        let disk_512 = DiskInfo::new(1024);
        assert_eq!(
            check_segments(&[seg(1, 7, 0)], &disk_512, SegmentOp::Discard),
            Ok(())
        );
    }

    #[test]
    fn more_sectors_than_the_segment_maximum_is_an_io_error() {
        let disk = DiskInfo::new(u64::MAX / 512);
        for op in [SegmentOp::Discard, SegmentOp::WriteZeroes] {
            let max = op.max_sectors();
            assert_eq!(check_segments(&[seg(0, max, 0)], &disk, op), Ok(()));
            assert_eq!(
                check_segments(&[seg(0, max + 1, 0)], &disk, op),
                Err(Status::IoErr)
            );
        }
    }

    #[test]
    fn limits_match_the_config_constants() {
        assert_eq!(SegmentOp::Discard.max_segments(), MAX_DISCARD_SEG);
        assert_eq!(SegmentOp::WriteZeroes.max_segments(), MAX_WRITE_ZEROES_SEG);
        assert_eq!(SegmentOp::Discard.max_sectors(), MAX_DISCARD_SECTORS);
        assert_eq!(
            SegmentOp::WriteZeroes.max_sectors(),
            MAX_WRITE_ZEROES_SECTORS
        );
    }

    #[test]
    fn unmap_reads_bit_0() {
        assert!(seg(0, 0, 1).unmap());
        assert!(seg(0, 0, 3).unmap());
        assert!(!seg(0, 0, 2).unmap());
    }
}
