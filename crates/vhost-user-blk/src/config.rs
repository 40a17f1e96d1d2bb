//! The virtio-blk configuration space (virtio 1.2 §5.2.4): its fields, its
//! little-endian byte image, and which driver writes it accepts.

use crate::disk::DiskInfo;
use crate::features::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH, has};
use crate::limits::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
};

/// Bytes of the config space this device exposes (up to and including
/// `unused1`; the secure-erase and zoned fields are not offered).
pub const CONFIG_LEN: usize = 60;
/// Offset of `writeback`, the only field the driver may write.
pub const WRITEBACK_OFFSET: u32 = 32;
/// Largest number of bytes one [`BlkConfig::read`] returns.
pub const MAX_CONFIG_READ: u32 = 4096;

const CAPACITY: usize = 0;
const SIZE_MAX: usize = 8;
const SEG_MAX: usize = 12;
const CYLINDERS: usize = 16;
const HEADS: usize = 18;
const SECTORS: usize = 19;
const BLK_SIZE: usize = 20;
const PHYSICAL_BLOCK_EXP: usize = 24;
const ALIGNMENT_OFFSET: usize = 25;
const MIN_IO_SIZE: usize = 26;
const OPT_IO_SIZE: usize = 28;
const WRITEBACK: usize = WRITEBACK_OFFSET as usize;
const UNUSED0: usize = 33;
const NUM_QUEUES: usize = 34;
const MAX_DISCARD_SECTORS_AT: usize = 36;
const MAX_DISCARD_SEG_AT: usize = 40;
const DISCARD_SECTOR_ALIGNMENT: usize = 44;
const MAX_WRITE_ZEROES_SECTORS_AT: usize = 48;
const MAX_WRITE_ZEROES_SEG_AT: usize = 52;
const WRITE_ZEROES_MAY_UNMAP: usize = 56;
const UNUSED1: usize = 57;

/// The legacy CHS geometry (`VIRTIO_BLK_F_GEOMETRY`, never offered: zeros).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

/// The physical layout (`VIRTIO_BLK_F_TOPOLOGY`), in logical blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// log2 of the logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size, in logical blocks; 0 for none.
    pub opt_io_size: u32,
}

/// `struct virtio_blk_config`, the first [`CONFIG_LEN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Largest data segment, in bytes (`SIZE_MAX`).
    pub size_max: u32,
    /// Most data segments in a request (`SEG_MAX`).
    pub seg_max: u32,
    /// Legacy geometry (zeros).
    pub geometry: Geometry,
    /// Logical block size in bytes (`BLK_SIZE`).
    pub blk_size: u32,
    /// Physical layout (`TOPOLOGY`).
    pub topology: Topology,
    /// 1 when the write cache is on (`CONFIG_WCE`); the driver may write it.
    pub writeback: u8,
    /// Padding, 0.
    pub unused0: u8,
    /// Number of request queues (`MQ`).
    pub num_queues: u16,
    /// Sectors in one DISCARD segment.
    pub max_discard_sectors: u32,
    /// Segments in one DISCARD request.
    pub max_discard_seg: u32,
    /// Alignment of DISCARD segments, in sectors.
    pub discard_sector_alignment: u32,
    /// Sectors in one WRITE_ZEROES segment.
    pub max_write_zeroes_sectors: u32,
    /// Segments in one WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// 1 when a WRITE_ZEROES with the unmap flag may deallocate sectors.
    pub write_zeroes_may_unmap: u8,
    /// Padding, 0.
    pub unused1: [u8; 3],
}

impl BlkConfig {
    /// The config space of a device backed by `disk`, with `num_queues`
    /// request queues (at least 1: the caller checks), at most `seg_max`
    /// data segments per request and `size_max` bytes per segment (both
    /// non-zero: Linux takes 0 literally).
    ///
    /// The discard and write-zeroes fields are zero when the feature is not
    /// offered; segments are aligned to the logical block.
    /// `write_zeroes_may_unmap` starts at 0: the I/O code sets it when its
    /// WRITE_ZEROES with unmap really deallocates (§5.2.6.2: "if and only
    /// if").
    pub fn new(disk: &DiskInfo, num_queues: u16, seg_max: u32, size_max: u32) -> Self {
        let exp = disk.physical_block_exp();
        let alignment = disk.sectors_per_block();
        let (max_discard_sectors, max_discard_seg, discard_sector_alignment) =
            if disk.offers_discard() {
                (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, alignment)
            } else {
                (0, 0, 0)
            };
        let (max_write_zeroes_sectors, max_write_zeroes_seg) = if disk.offers_write_zeroes() {
            (MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG)
        } else {
            (0, 0)
        };
        BlkConfig {
            capacity: disk.capacity_sectors,
            size_max,
            seg_max,
            geometry: Geometry::default(),
            blk_size: disk.logical_block_size,
            topology: Topology {
                physical_block_exp: exp,
                alignment_offset: 0,
                min_io_size: u16::try_from(1u32 << exp).unwrap_or(u16::MAX),
                opt_io_size: 0,
            },
            writeback: u8::from(disk.writeback),
            unused0: 0,
            num_queues,
            max_discard_sectors,
            max_discard_seg,
            discard_sector_alignment,
            max_write_zeroes_sectors,
            max_write_zeroes_seg,
            write_zeroes_may_unmap: 0,
            unused1: [0; 3],
        }
    }

    /// Applies what feature negotiation implies for the config space: with
    /// `CONFIG_WCE` but not `FLUSH` negotiated the device MUST start with
    /// `writeback` 0 (§5.2.5.2), as the driver could never flush.
    pub fn features_negotiated(&mut self, negotiated: u64) {
        if has(negotiated, VIRTIO_BLK_F_CONFIG_WCE) && !has(negotiated, VIRTIO_BLK_F_FLUSH) {
            self.writeback = 0;
        }
    }

    /// The little-endian byte image.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut bytes = [0; CONFIG_LEN];
        let mut put = |offset: usize, field: &[u8]| {
            bytes[offset..offset + field.len()].copy_from_slice(field);
        };
        put(CAPACITY, &self.capacity.to_le_bytes());
        put(SIZE_MAX, &self.size_max.to_le_bytes());
        put(SEG_MAX, &self.seg_max.to_le_bytes());
        put(CYLINDERS, &self.geometry.cylinders.to_le_bytes());
        put(HEADS, &[self.geometry.heads]);
        put(SECTORS, &[self.geometry.sectors]);
        put(BLK_SIZE, &self.blk_size.to_le_bytes());
        put(PHYSICAL_BLOCK_EXP, &[self.topology.physical_block_exp]);
        put(ALIGNMENT_OFFSET, &[self.topology.alignment_offset]);
        put(MIN_IO_SIZE, &self.topology.min_io_size.to_le_bytes());
        put(OPT_IO_SIZE, &self.topology.opt_io_size.to_le_bytes());
        put(WRITEBACK, &[self.writeback]);
        put(UNUSED0, &[self.unused0]);
        put(NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(
            MAX_DISCARD_SECTORS_AT,
            &self.max_discard_sectors.to_le_bytes(),
        );
        put(MAX_DISCARD_SEG_AT, &self.max_discard_seg.to_le_bytes());
        put(
            DISCARD_SECTOR_ALIGNMENT,
            &self.discard_sector_alignment.to_le_bytes(),
        );
        put(
            MAX_WRITE_ZEROES_SECTORS_AT,
            &self.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            MAX_WRITE_ZEROES_SEG_AT,
            &self.max_write_zeroes_seg.to_le_bytes(),
        );
        put(WRITE_ZEROES_MAY_UNMAP, &[self.write_zeroes_may_unmap]);
        put(UNUSED1, &self.unused1);
        bytes
    }

    /// The config space a byte image describes (for drivers and tests).
    pub fn from_bytes(bytes: &[u8; CONFIG_LEN]) -> Self {
        let u16_at = |offset: usize| u16::from_le_bytes([bytes[offset], bytes[offset + 1]]);
        let u32_at = |offset: usize| {
            let mut field = [0; 4];
            field.copy_from_slice(&bytes[offset..offset + 4]);
            u32::from_le_bytes(field)
        };
        let mut capacity = [0; 8];
        capacity.copy_from_slice(&bytes[CAPACITY..CAPACITY + 8]);
        BlkConfig {
            capacity: u64::from_le_bytes(capacity),
            size_max: u32_at(SIZE_MAX),
            seg_max: u32_at(SEG_MAX),
            geometry: Geometry {
                cylinders: u16_at(CYLINDERS),
                heads: bytes[HEADS],
                sectors: bytes[SECTORS],
            },
            blk_size: u32_at(BLK_SIZE),
            topology: Topology {
                physical_block_exp: bytes[PHYSICAL_BLOCK_EXP],
                alignment_offset: bytes[ALIGNMENT_OFFSET],
                min_io_size: u16_at(MIN_IO_SIZE),
                opt_io_size: u32_at(OPT_IO_SIZE),
            },
            writeback: bytes[WRITEBACK],
            unused0: bytes[UNUSED0],
            num_queues: u16_at(NUM_QUEUES),
            max_discard_sectors: u32_at(MAX_DISCARD_SECTORS_AT),
            max_discard_seg: u32_at(MAX_DISCARD_SEG_AT),
            discard_sector_alignment: u32_at(DISCARD_SECTOR_ALIGNMENT),
            max_write_zeroes_sectors: u32_at(MAX_WRITE_ZEROES_SECTORS_AT),
            max_write_zeroes_seg: u32_at(MAX_WRITE_ZEROES_SEG_AT),
            write_zeroes_may_unmap: bytes[WRITE_ZEROES_MAY_UNMAP],
            unused1: [bytes[UNUSED1], bytes[UNUSED1 + 1], bytes[UNUSED1 + 2]],
        }
    }

    /// `len` bytes from `offset` (at most [`MAX_CONFIG_READ`]); bytes past
    /// [`CONFIG_LEN`] read as zero. Never panics.
    pub fn read(&self, offset: u32, len: u32) -> Vec<u8> {
        let image = self.to_bytes();
        (0..len.min(MAX_CONFIG_READ))
            .map(|i| {
                let at = u64::from(offset) + u64::from(i);
                usize::try_from(at)
                    .ok()
                    .and_then(|at| image.get(at))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// A driver write of `data` at `offset`. Only `writeback` (one byte at
    /// [`WRITEBACK_OFFSET`], value 0 or 1) is writable, and only when
    /// `CONFIG_WCE` was negotiated. A refused write changes nothing.
    pub fn write(
        &mut self,
        offset: u32,
        data: &[u8],
        negotiated: u64,
    ) -> Result<(), ConfigWriteError> {
        let len = data.len();
        let end = u64::from(offset).saturating_add(len as u64);
        if len == 0 {
            return Err(ConfigWriteError::Empty { offset });
        }
        if end > CONFIG_LEN as u64 {
            return Err(ConfigWriteError::OutOfRange { offset, len });
        }
        let [value] = data else {
            return Err(ConfigWriteError::ReadOnly { offset, len });
        };
        if offset != WRITEBACK_OFFSET {
            return Err(ConfigWriteError::ReadOnly { offset, len });
        }
        if !has(negotiated, VIRTIO_BLK_F_CONFIG_WCE) {
            return Err(ConfigWriteError::WceNotNegotiated);
        }
        if *value > 1 {
            return Err(ConfigWriteError::BadWriteback { value: *value });
        }
        self.writeback = *value;
        Ok(())
    }
}

/// Why a driver write to the config space was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWriteError {
    /// No bytes to write.
    #[error("empty config write at offset {offset}")]
    Empty {
        /// Where.
        offset: u32,
    },
    /// The write reaches past the config space.
    #[error(
        "config write of {len} bytes at offset {offset} reaches past the {CONFIG_LEN}-byte config space"
    )]
    OutOfRange {
        /// Where.
        offset: u32,
        /// Bytes written.
        len: usize,
    },
    /// The write touches a read-only field (everything but a 1-byte write
    /// of `writeback`).
    #[error(
        "config write of {len} bytes at offset {offset} touches read-only fields; only writeback (1 byte at offset {WRITEBACK_OFFSET}) is writable"
    )]
    ReadOnly {
        /// Where.
        offset: u32,
        /// Bytes written.
        len: usize,
    },
    /// `writeback` is writable only after `VIRTIO_BLK_F_CONFIG_WCE`.
    #[error("writeback written but VIRTIO_BLK_F_CONFIG_WCE was not negotiated")]
    WceNotNegotiated,
    /// `writeback` takes 0 (writethrough) or 1 (writeback).
    #[error("writeback value {value} is neither 0 (writethrough) nor 1 (writeback)")]
    BadWriteback {
        /// The value written.
        value: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::bit;

    const WCE: u64 = 1 << VIRTIO_BLK_F_CONFIG_WCE;
    const FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;

    /// Every field distinct and multi-byte fields with distinct bytes, so a
    /// misplaced or byte-swapped field shows.
    fn distinct() -> BlkConfig {
        BlkConfig {
            capacity: 0x0807_0605_0403_0201,
            size_max: 0x0c0b_0a09,
            seg_max: 0x100f_0e0d,
            geometry: Geometry {
                cylinders: 0x1211,
                heads: 0x13,
                sectors: 0x14,
            },
            blk_size: 0x1817_1615,
            topology: Topology {
                physical_block_exp: 0x19,
                alignment_offset: 0x1a,
                min_io_size: 0x1c1b,
                opt_io_size: 0x201f_1e1d,
            },
            writeback: 0x21,
            unused0: 0x22,
            num_queues: 0x2423,
            max_discard_sectors: 0x2827_2625,
            max_discard_seg: 0x2c2b_2a29,
            discard_sector_alignment: 0x302f_2e2d,
            max_write_zeroes_sectors: 0x3433_3231,
            max_write_zeroes_seg: 0x3837_3635,
            write_zeroes_may_unmap: 0x39,
            unused1: [0x3a, 0x3b, 0x3c],
        }
    }

    #[test]
    fn every_field_sits_at_its_spec_offset_little_endian() {
        // Byte i of the image holds i + 1.
        let expected: Vec<u8> = (1..=CONFIG_LEN as u8).collect();
        assert_eq!(distinct().to_bytes().to_vec(), expected);
    }

    #[test]
    fn bytes_round_trip() {
        let config = distinct();
        assert_eq!(BlkConfig::from_bytes(&config.to_bytes()), config);
        let image: [u8; CONFIG_LEN] = std::array::from_fn(|i| (0xff - i) as u8);
        assert_eq!(BlkConfig::from_bytes(&image).to_bytes(), image);
    }

    #[test]
    fn new_describes_the_disk() {
        let disk = DiskInfo {
            capacity_sectors: 0x1_0000_0000,
            logical_block_size: 4096,
            physical_block_size: 16384,
            discard: true,
            write_zeroes: true,
            writeback: false,
            ..DiskInfo::new(0)
        };
        let config = BlkConfig::new(&disk, 4, 126, 1 << 20);
        assert_eq!(config.capacity, 0x1_0000_0000);
        assert_eq!(config.size_max, 1 << 20);
        assert_eq!(config.seg_max, 126);
        assert_eq!(config.geometry, Geometry::default());
        assert_eq!(config.blk_size, 4096);
        assert_eq!(
            config.topology,
            Topology {
                physical_block_exp: 2,
                alignment_offset: 0,
                min_io_size: 4,
                opt_io_size: 0,
            }
        );
        assert_eq!(config.writeback, 0);
        assert_eq!(config.num_queues, 4);
        assert_eq!(config.max_discard_sectors, MAX_DISCARD_SECTORS);
        assert_eq!(config.max_discard_seg, MAX_DISCARD_SEG);
        assert_eq!(config.discard_sector_alignment, 8);
        assert_eq!(config.max_write_zeroes_sectors, MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(config.max_write_zeroes_seg, MAX_WRITE_ZEROES_SEG);
        assert_eq!(config.write_zeroes_may_unmap, 0);
        assert_eq!((config.unused0, config.unused1), (0, [0; 3]));
    }

    #[test]
    fn new_zeroes_discard_and_write_zeroes_fields_when_not_offered() {
        let read_only = DiskInfo {
            read_only: true,
            discard: true,
            write_zeroes: true,
            ..DiskInfo::new(8)
        };
        for disk in [DiskInfo::new(8), read_only] {
            let config = BlkConfig::new(&disk, 1, 1, 4096);
            assert_eq!(config.max_discard_sectors, 0);
            assert_eq!(config.max_discard_seg, 0);
            assert_eq!(config.discard_sector_alignment, 0);
            assert_eq!(config.max_write_zeroes_sectors, 0);
            assert_eq!(config.max_write_zeroes_seg, 0);
            assert_eq!(config.writeback, 1);
        }
    }

    #[test]
    fn config_wce_without_flush_starts_writeback_at_zero() {
        let mut config = BlkConfig::new(&DiskInfo::new(8), 1, 1, 4096);
        config.features_negotiated(WCE | FLUSH);
        assert_eq!(config.writeback, 1);
        config.features_negotiated(FLUSH);
        assert_eq!(config.writeback, 1);
        config.features_negotiated(WCE);
        assert_eq!(config.writeback, 0);
    }

    #[test]
    fn read_returns_the_image_at_every_offset_and_length() {
        let config = distinct();
        let image = config.to_bytes();
        for offset in 0..=CONFIG_LEN as u32 + 8 {
            for len in 0..=CONFIG_LEN as u32 + 8 {
                let got = config.read(offset, len);
                assert_eq!(got.len(), len as usize);
                for (i, byte) in got.iter().enumerate() {
                    let at = offset as usize + i;
                    let want = image.get(at).copied().unwrap_or(0);
                    assert_eq!(*byte, want, "offset {offset} len {len} byte {i}");
                }
            }
        }
    }

    #[test]
    fn read_far_out_of_range_is_zeros_and_capped() {
        let config = distinct();
        assert_eq!(config.read(u32::MAX, 4), vec![0; 4]);
        assert_eq!(
            config.read(u32::MAX - 1, u32::MAX).len(),
            MAX_CONFIG_READ as usize
        );
        let big = config.read(0, u32::MAX);
        assert_eq!(big.len(), MAX_CONFIG_READ as usize);
        assert_eq!(&big[..CONFIG_LEN], &config.to_bytes());
        assert!(big[CONFIG_LEN..].iter().all(|&b| b == 0));
    }

    #[test]
    fn writeback_is_writable_with_config_wce() {
        let mut config = BlkConfig::new(&DiskInfo::new(8), 1, 1, 4096);
        assert_eq!(config.write(WRITEBACK_OFFSET, &[0], WCE), Ok(()));
        assert_eq!(config.writeback, 0);
        assert_eq!(config.read(WRITEBACK_OFFSET, 1), vec![0]);
        assert_eq!(config.write(WRITEBACK_OFFSET, &[1], WCE | bit(32)), Ok(()));
        assert_eq!(config.writeback, 1);
    }

    #[test]
    fn writeback_write_without_config_wce_is_refused() {
        let mut config = BlkConfig::new(&DiskInfo::new(8), 1, 1, 4096);
        let before = config;
        assert_eq!(
            config.write(WRITEBACK_OFFSET, &[0], FLUSH),
            Err(ConfigWriteError::WceNotNegotiated)
        );
        assert_eq!(config, before);
    }

    #[test]
    fn writeback_values_other_than_0_and_1_are_refused() {
        let mut config = BlkConfig::new(&DiskInfo::new(8), 1, 1, 4096);
        let before = config;
        for value in [2, 0x80, 0xff] {
            assert_eq!(
                config.write(WRITEBACK_OFFSET, &[value], WCE),
                Err(ConfigWriteError::BadWriteback { value })
            );
        }
        assert_eq!(config, before);
    }

    #[test]
    fn writes_to_any_other_byte_are_refused_and_change_nothing() {
        let mut config = distinct();
        let before = config;
        for offset in 0..CONFIG_LEN as u32 {
            if offset == WRITEBACK_OFFSET {
                continue;
            }
            assert_eq!(
                config.write(offset, &[0], WCE),
                Err(ConfigWriteError::ReadOnly { offset, len: 1 })
            );
        }
        assert_eq!(config, before);
    }

    #[test]
    fn multi_byte_writes_covering_writeback_are_refused() {
        let mut config = distinct();
        let before = config;
        assert_eq!(
            config.write(WRITEBACK_OFFSET, &[1, 0], WCE),
            Err(ConfigWriteError::ReadOnly {
                offset: WRITEBACK_OFFSET,
                len: 2
            })
        );
        assert_eq!(
            config.write(28, &[0; 8], WCE),
            Err(ConfigWriteError::ReadOnly { offset: 28, len: 8 })
        );
        assert_eq!(config, before);
    }

    #[test]
    fn empty_and_out_of_range_writes_are_refused() {
        let mut config = distinct();
        let before = config;
        assert_eq!(
            config.write(WRITEBACK_OFFSET, &[], WCE),
            Err(ConfigWriteError::Empty {
                offset: WRITEBACK_OFFSET
            })
        );
        assert_eq!(
            config.write(CONFIG_LEN as u32, &[0], WCE),
            Err(ConfigWriteError::OutOfRange {
                offset: CONFIG_LEN as u32,
                len: 1
            })
        );
        assert_eq!(
            config.write(58, &[0; 4], WCE),
            Err(ConfigWriteError::OutOfRange { offset: 58, len: 4 })
        );
        assert_eq!(
            config.write(u32::MAX, &[1], WCE),
            Err(ConfigWriteError::OutOfRange {
                offset: u32::MAX,
                len: 1
            })
        );
        assert_eq!(config, before);
    }
}
