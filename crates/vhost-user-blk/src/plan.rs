//! What to do with a well-formed request, decided from its header, its
//! layout, the disk and the negotiated features (virtio 1.2 §5.2.6), and
//! the used length to report once it is done.
//!
//! Choices where the spec leaves room:
//!
//! * Data going the wrong way (readable data on IN, GET_ID or FLUSH;
//!   writable data besides the status on OUT, FLUSH, DISCARD or
//!   WRITE_ZEROES) is a malformed request: IOERR.
//! * IN and OUT must start and end on a logical block (512 bytes unless
//!   the disk says more, as `blk_size` advertises), like QEMU: IOERR
//!   otherwise. The spec's own rule is "a multiple of 512 bytes".
//! * A zero-length IN or OUT is accepted when its sector is aligned and at
//!   most the capacity (the end of the disk included): `len` 0, nothing to
//!   do, status OK. OUT of zero bytes on a read-only disk is still IOERR.
//! * The `sector` field of FLUSH, GET_ID, DISCARD and WRITE_ZEROES is
//!   ignored (the driver sets it to 0).
//! * FLUSH without `VIRTIO_BLK_F_FLUSH` negotiated, DISCARD and
//!   WRITE_ZEROES without their feature, GET_LIFETIME, SECURE_ERASE and
//!   unknown types (including the legacy barrier bit) are UNSUPP.
//! * GET_ID needs at least one writable data byte (IOERR otherwise) and
//!   fills at most 20.
//! * `size_max` and `seg_max` are advice to the driver; they are not
//!   enforced here (the chain length is, by [`layout`](crate::layout::layout)).

use crate::disk::DiskInfo;
use crate::features::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES, has};
use crate::layout::{ByteRange, ChainLayout};
use crate::request::{
    RequestHeader, SECTOR_SIZE, Status, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use crate::segments::{SegmentOp, segment_count};
use crate::serial::ID_BYTES;

/// What the I/O code does for one request. Whatever it is, the status byte
/// is written at [`ChainLayout::status_at`] afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Read `len` bytes of the disk at `offset_bytes` into the writable
    /// data (which is exactly `len` bytes).
    Read {
        /// Byte offset on the disk.
        offset_bytes: u64,
        /// Bytes; may be 0.
        len: u64,
    },
    /// Write the readable data (exactly `len` bytes) to the disk at
    /// `offset_bytes`.
    Write {
        /// Byte offset on the disk.
        offset_bytes: u64,
        /// Bytes; may be 0.
        len: u64,
    },
    /// Make every completed write stable.
    Flush,
    /// Copy the first `len` bytes of the ID string (see
    /// [`id_bytes`](crate::serial::id_bytes)) to the writable data.
    GetId {
        /// Bytes to fill, 1..=20.
        len: u64,
    },
    /// Parse the readable data with
    /// [`parse_segments`](crate::segments::parse_segments) (its length is
    /// already checked), check them with
    /// [`check_segments`](crate::segments::check_segments) and
    /// [`SegmentOp::Discard`], then deallocate them.
    Discard,
    /// As [`Plan::Discard`], with [`SegmentOp::WriteZeroes`], then zero
    /// the ranges.
    WriteZeroes,
    /// Nothing to do but write this status.
    Fail(Status),
}

/// Decides what `header` asks of the device (choices in the module
/// documentation). `negotiated` is the driver's accepted feature set.
pub fn plan(
    header: &RequestHeader,
    layout: &ChainLayout,
    disk: &DiskInfo,
    negotiated: u64,
) -> Plan {
    let decided = match header.kind {
        VIRTIO_BLK_T_IN => read(header, layout, disk),
        VIRTIO_BLK_T_OUT => write(header, layout, disk),
        VIRTIO_BLK_T_FLUSH => flush(layout, negotiated),
        VIRTIO_BLK_T_GET_ID => get_id(layout),
        VIRTIO_BLK_T_DISCARD => segments(SegmentOp::Discard, layout, disk, negotiated),
        VIRTIO_BLK_T_WRITE_ZEROES => segments(SegmentOp::WriteZeroes, layout, disk, negotiated),
        _ => Err(Status::Unsupp),
    };
    decided.unwrap_or_else(Plan::Fail)
}

/// The used length to report: the bytes written into device-writable
/// buffers, counted from their start. The status byte is always one of
/// them; a successful Read adds its data and a successful GetId the bytes
/// of ID it filled. A chain [`layout`](crate::layout::layout) refused but
/// whose [`status_piece`](crate::layout::status_piece) took an IOERR also
/// reports 1.
pub fn used_len(plan: &Plan, status: Status) -> u32 {
    let data = match (plan, status) {
        (Plan::Read { len, .. }, Status::Ok) | (Plan::GetId { len }, Status::Ok) => *len,
        _ => 0,
    };
    // A layout's writable stream is at most MAX_CHAIN_BYTES = u32::MAX.
    u32::try_from(data.saturating_add(1)).unwrap_or(u32::MAX)
}

fn read(header: &RequestHeader, layout: &ChainLayout, disk: &DiskInfo) -> Result<Plan, Status> {
    refuse_data(layout.readable_data)?;
    let (offset_bytes, len) = disk_range(header.sector, layout.writable_data, disk)?;
    Ok(Plan::Read { offset_bytes, len })
}

fn write(header: &RequestHeader, layout: &ChainLayout, disk: &DiskInfo) -> Result<Plan, Status> {
    refuse_data(layout.writable_data)?;
    if disk.read_only {
        return Err(Status::IoErr);
    }
    let (offset_bytes, len) = disk_range(header.sector, layout.readable_data, disk)?;
    Ok(Plan::Write { offset_bytes, len })
}

fn flush(layout: &ChainLayout, negotiated: u64) -> Result<Plan, Status> {
    if !has(negotiated, VIRTIO_BLK_F_FLUSH) {
        return Err(Status::Unsupp);
    }
    refuse_data(layout.readable_data)?;
    refuse_data(layout.writable_data)?;
    Ok(Plan::Flush)
}

fn get_id(layout: &ChainLayout) -> Result<Plan, Status> {
    refuse_data(layout.readable_data)?;
    let room = layout.writable_data.len();
    if room == 0 {
        return Err(Status::IoErr);
    }
    Ok(Plan::GetId {
        len: room.min(ID_BYTES as u64),
    })
}

fn segments(
    op: SegmentOp,
    layout: &ChainLayout,
    disk: &DiskInfo,
    negotiated: u64,
) -> Result<Plan, Status> {
    let (feature, disk_can) = match op {
        SegmentOp::Discard => (VIRTIO_BLK_F_DISCARD, disk.discard),
        SegmentOp::WriteZeroes => (VIRTIO_BLK_F_WRITE_ZEROES, disk.write_zeroes),
    };
    if !has(negotiated, feature) {
        return Err(Status::Unsupp);
    }
    if disk.read_only {
        return Err(Status::IoErr);
    }
    if !disk_can {
        return Err(Status::Unsupp);
    }
    refuse_data(layout.writable_data)?;
    segment_count(layout.readable_data.len(), op.max_segments())?;
    Ok(match op {
        SegmentOp::Discard => Plan::Discard,
        SegmentOp::WriteZeroes => Plan::WriteZeroes,
    })
}

/// IOERR when data goes a way this request does not use.
fn refuse_data(data: ByteRange) -> Result<(), Status> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(Status::IoErr)
    }
}

/// The byte offset and length of an IN or OUT: aligned to the logical
/// block, inside the disk, without overflow; IOERR otherwise.
fn disk_range(sector: u64, data: ByteRange, disk: &DiskInfo) -> Result<(u64, u64), Status> {
    let offset = sector
        .checked_mul(u64::from(SECTOR_SIZE))
        .ok_or(Status::IoErr)?;
    let len = data.len();
    let block = u64::from(disk.logical_block_size.max(SECTOR_SIZE));
    if offset % block != 0 || len % block != 0 {
        return Err(Status::IoErr);
    }
    let end = offset.checked_add(len).ok_or(Status::IoErr)?;
    let capacity = disk.capacity_bytes().ok_or(Status::IoErr)?;
    if end > capacity {
        return Err(Status::IoErr);
    }
    Ok((offset, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::bit;
    use crate::layout::{Segment, layout};
    use crate::request::{VIRTIO_BLK_T_GET_LIFETIME, VIRTIO_BLK_T_SECURE_ERASE};
    use crate::segments::SEGMENT_LEN;

    const ALL: u64 =
        (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    /// 1 MiB.
    const CAPACITY_SECTORS: u64 = 2048;
    const CAPACITY_BYTES: u64 = CAPACITY_SECTORS * 512;

    fn disk() -> DiskInfo {
        DiskInfo {
            discard: true,
            write_zeroes: true,
            ..DiskInfo::new(CAPACITY_SECTORS)
        }
    }

    fn read_only() -> DiskInfo {
        DiskInfo {
            read_only: true,
            ..disk()
        }
    }

    fn disk_4k() -> DiskInfo {
        DiskInfo {
            logical_block_size: 4096,
            physical_block_size: 4096,
            ..disk()
        }
    }

    /// A chain with a 16-byte header, `readable` data bytes, `writable`
    /// data bytes and a status byte.
    fn chain(readable: u32, writable: u32) -> ChainLayout {
        let segments = [
            Segment {
                len: 16 + readable,
                writable: false,
            },
            Segment {
                len: writable + 1,
                writable: true,
            },
        ];
        layout(&segments).unwrap()
    }

    fn header(kind: u32, sector: u64) -> RequestHeader {
        RequestHeader { kind, sector }
    }

    fn plan_for(kind: u32, sector: u64, readable: u32, writable: u32) -> Plan {
        plan(
            &header(kind, sector),
            &chain(readable, writable),
            &disk(),
            ALL,
        )
    }

    #[test]
    fn read_plans_the_writable_data() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_IN, 8, 0, 4096),
            Plan::Read {
                offset_bytes: 4096,
                len: 4096
            }
        );
    }

    #[test]
    fn read_of_the_last_sector_is_in_range() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_IN, CAPACITY_SECTORS - 1, 0, 512),
            Plan::Read {
                offset_bytes: CAPACITY_BYTES - 512,
                len: 512
            }
        );
    }

    #[test]
    fn read_works_on_a_read_only_disk() {
        assert_eq!(
            plan(&header(VIRTIO_BLK_T_IN, 0), &chain(0, 512), &read_only(), 0),
            Plan::Read {
                offset_bytes: 0,
                len: 512
            }
        );
    }

    #[test]
    fn zero_length_read_and_write_have_nothing_to_do() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_IN, 3, 0, 0),
            Plan::Read {
                offset_bytes: 1536,
                len: 0
            }
        );
        assert_eq!(
            plan_for(VIRTIO_BLK_T_OUT, CAPACITY_SECTORS, 0, 0),
            Plan::Write {
                offset_bytes: CAPACITY_BYTES,
                len: 0
            }
        );
        assert_eq!(
            plan_for(VIRTIO_BLK_T_IN, CAPACITY_SECTORS + 1, 0, 0),
            Plan::Fail(Status::IoErr)
        );
    }

    #[test]
    fn read_with_readable_data_is_an_io_error() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_IN, 0, 512, 512),
            Plan::Fail(Status::IoErr)
        );
    }

    #[test]
    fn data_length_not_a_multiple_of_512_is_an_io_error() {
        for len in [1, 511, 513, 1000] {
            assert_eq!(
                plan_for(VIRTIO_BLK_T_IN, 0, 0, len),
                Plan::Fail(Status::IoErr)
            );
            assert_eq!(
                plan_for(VIRTIO_BLK_T_OUT, 0, len, 0),
                Plan::Fail(Status::IoErr)
            );
        }
    }

    #[test]
    fn transfers_past_the_capacity_are_io_errors() {
        for (sector, len) in [
            (CAPACITY_SECTORS, 512),
            (CAPACITY_SECTORS - 1, 1024),
            (0, CAPACITY_BYTES as u32 + 512),
            (u64::MAX / 512, 512),
        ] {
            assert_eq!(
                plan_for(VIRTIO_BLK_T_IN, sector, 0, len),
                Plan::Fail(Status::IoErr)
            );
            assert_eq!(
                plan_for(VIRTIO_BLK_T_OUT, sector, len, 0),
                Plan::Fail(Status::IoErr)
            );
        }
    }

    #[test]
    fn sector_whose_byte_offset_overflows_is_an_io_error() {
        let huge = DiskInfo::new(u64::MAX / 512);
        for sector in [u64::MAX / 512 + 1, u64::MAX] {
            assert_eq!(
                plan(&header(VIRTIO_BLK_T_IN, sector), &chain(0, 0), &huge, 0),
                Plan::Fail(Status::IoErr)
            );
        }
        // offset fits, offset + len does not.
        let last = (u64::MAX / 512) & !7;
        assert_eq!(
            plan(&header(VIRTIO_BLK_T_IN, last), &chain(0, 8192), &huge, 0),
            Plan::Fail(Status::IoErr)
        );
    }

    #[test]
    fn transfers_not_aligned_to_a_4k_logical_block_are_io_errors() {
        let disk = disk_4k();
        let io = |kind, sector, readable, writable| {
            plan(
                &header(kind, sector),
                &chain(readable, writable),
                &disk,
                ALL,
            )
        };
        assert_eq!(
            io(VIRTIO_BLK_T_IN, 8, 0, 8192),
            Plan::Read {
                offset_bytes: 4096,
                len: 8192
            }
        );
        assert_eq!(io(VIRTIO_BLK_T_IN, 1, 0, 4096), Plan::Fail(Status::IoErr));
        assert_eq!(io(VIRTIO_BLK_T_IN, 8, 0, 512), Plan::Fail(Status::IoErr));
        assert_eq!(io(VIRTIO_BLK_T_OUT, 4, 4096, 0), Plan::Fail(Status::IoErr));
        assert_eq!(io(VIRTIO_BLK_T_OUT, 8, 1024, 0), Plan::Fail(Status::IoErr));
    }

    #[test]
    fn write_plans_the_readable_data() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_OUT, 16, 1024, 0),
            Plan::Write {
                offset_bytes: 8192,
                len: 1024
            }
        );
    }

    #[test]
    fn write_with_writable_data_is_an_io_error() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_OUT, 0, 512, 512),
            Plan::Fail(Status::IoErr)
        );
    }

    #[test]
    fn every_write_to_a_read_only_disk_is_an_io_error() {
        for (kind, readable) in [
            (VIRTIO_BLK_T_OUT, 512),
            (VIRTIO_BLK_T_OUT, 0),
            (VIRTIO_BLK_T_DISCARD, 16),
            (VIRTIO_BLK_T_WRITE_ZEROES, 16),
        ] {
            assert_eq!(
                plan(&header(kind, 0), &chain(readable, 0), &read_only(), ALL),
                Plan::Fail(Status::IoErr),
                "type {kind}"
            );
        }
    }

    #[test]
    fn flush_is_planned_when_negotiated_even_on_a_read_only_disk() {
        assert_eq!(plan_for(VIRTIO_BLK_T_FLUSH, 0, 0, 0), Plan::Flush);
        assert_eq!(plan_for(VIRTIO_BLK_T_FLUSH, 77, 0, 0), Plan::Flush);
        let flush = bit(VIRTIO_BLK_F_FLUSH);
        assert_eq!(
            plan(
                &header(VIRTIO_BLK_T_FLUSH, 0),
                &chain(0, 0),
                &read_only(),
                flush
            ),
            Plan::Flush
        );
    }

    #[test]
    fn flush_without_the_flush_feature_is_unsupported() {
        let others = ALL & !bit(VIRTIO_BLK_F_FLUSH);
        assert_eq!(
            plan(
                &header(VIRTIO_BLK_T_FLUSH, 0),
                &chain(0, 0),
                &disk(),
                others
            ),
            Plan::Fail(Status::Unsupp)
        );
    }

    #[test]
    fn flush_with_data_is_an_io_error() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_FLUSH, 0, 512, 0),
            Plan::Fail(Status::IoErr)
        );
        assert_eq!(
            plan_for(VIRTIO_BLK_T_FLUSH, 0, 0, 512),
            Plan::Fail(Status::IoErr)
        );
    }

    #[test]
    fn get_id_fills_at_most_20_bytes() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_GET_ID, 0, 0, 20),
            Plan::GetId { len: 20 }
        );
        assert_eq!(
            plan_for(VIRTIO_BLK_T_GET_ID, 0, 0, 512),
            Plan::GetId { len: 20 }
        );
        assert_eq!(
            plan_for(VIRTIO_BLK_T_GET_ID, 9, 0, 7),
            Plan::GetId { len: 7 }
        );
    }

    #[test]
    fn get_id_without_room_or_with_readable_data_is_an_io_error() {
        assert_eq!(
            plan_for(VIRTIO_BLK_T_GET_ID, 0, 0, 0),
            Plan::Fail(Status::IoErr)
        );
        assert_eq!(
            plan_for(VIRTIO_BLK_T_GET_ID, 0, 16, 20),
            Plan::Fail(Status::IoErr)
        );
    }

    #[test]
    fn discard_and_write_zeroes_are_planned_with_a_valid_segment_list() {
        assert_eq!(plan_for(VIRTIO_BLK_T_DISCARD, 0, 16, 0), Plan::Discard);
        assert_eq!(
            plan_for(VIRTIO_BLK_T_WRITE_ZEROES, 0, 32, 0),
            Plan::WriteZeroes
        );
        let max = SegmentOp::Discard.max_segments() * SEGMENT_LEN as u32;
        assert_eq!(plan_for(VIRTIO_BLK_T_DISCARD, 0, max, 0), Plan::Discard);
    }

    #[test]
    fn discard_and_write_zeroes_not_negotiated_are_unsupported() {
        for (kind, feature) in [
            (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_F_DISCARD),
            (VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_F_WRITE_ZEROES),
        ] {
            let negotiated = ALL & !bit(feature);
            assert_eq!(
                plan(&header(kind, 0), &chain(16, 0), &disk(), negotiated),
                Plan::Fail(Status::Unsupp)
            );
        }
    }

    #[test]
    fn discard_and_write_zeroes_the_disk_cannot_do_are_unsupported() {
        let unable = DiskInfo::new(CAPACITY_SECTORS);
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            assert_eq!(
                plan(&header(kind, 0), &chain(16, 0), &unable, ALL),
                Plan::Fail(Status::Unsupp)
            );
        }
    }

    #[test]
    fn bad_segment_list_lengths_are_io_errors() {
        let too_many = (SegmentOp::WriteZeroes.max_segments() + 1) * SEGMENT_LEN as u32;
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            for readable in [0, 8, 24, too_many] {
                assert_eq!(
                    plan_for(kind, 0, readable, 0),
                    Plan::Fail(Status::IoErr),
                    "type {kind}, {readable} bytes"
                );
            }
            assert_eq!(plan_for(kind, 0, 16, 1), Plan::Fail(Status::IoErr));
        }
    }

    #[test]
    fn unsupported_and_unknown_types_are_unsupported() {
        for kind in [
            VIRTIO_BLK_T_GET_LIFETIME,
            VIRTIO_BLK_T_SECURE_ERASE,
            2,
            3,
            5,
            15,
            16,
            0x8000_0000,
            0x8000_0001,
            u32::MAX,
        ] {
            assert_eq!(
                plan_for(kind, 0, 0, 512),
                Plan::Fail(Status::Unsupp),
                "type {kind:#x}"
            );
        }
    }

    #[test]
    fn used_len_counts_read_data_and_id_bytes_only_on_success() {
        let read = Plan::Read {
            offset_bytes: 0,
            len: 4096,
        };
        assert_eq!(used_len(&read, Status::Ok), 4097);
        assert_eq!(used_len(&read, Status::IoErr), 1);
        let empty = Plan::Read {
            offset_bytes: 0,
            len: 0,
        };
        assert_eq!(used_len(&empty, Status::Ok), 1);
        assert_eq!(used_len(&Plan::GetId { len: 20 }, Status::Ok), 21);
        assert_eq!(used_len(&Plan::GetId { len: 7 }, Status::Ok), 8);
        assert_eq!(used_len(&Plan::GetId { len: 20 }, Status::IoErr), 1);
    }

    #[test]
    fn used_len_is_the_status_byte_for_everything_else() {
        let write = Plan::Write {
            offset_bytes: 0,
            len: 4096,
        };
        for plan in [
            write,
            Plan::Flush,
            Plan::Discard,
            Plan::WriteZeroes,
            Plan::Fail(Status::IoErr),
            Plan::Fail(Status::Unsupp),
        ] {
            for status in [Status::Ok, Status::IoErr, Status::Unsupp] {
                assert_eq!(used_len(&plan, status), 1, "{plan:?} {status:?}");
            }
        }
    }

    #[test]
    fn used_len_saturates_instead_of_wrapping() {
        let huge = Plan::Read {
            offset_bytes: 0,
            len: u64::MAX,
        };
        assert_eq!(used_len(&huge, Status::Ok), u32::MAX);
    }
}
