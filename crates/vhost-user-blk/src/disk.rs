//! What the device knows about the disk behind it.

use crate::request::SECTOR_SIZE;

/// Largest logical or physical block size accepted (64 KiB).
pub const MAX_BLOCK_SIZE: u32 = 1 << 16;

/// The disk's size, block sizes and abilities, as the operator configured
/// them (or as probed from the backing file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors (the protocol's unit, whatever the block
    /// size).
    pub capacity_sectors: u64,
    /// Refuse every request that changes the disk.
    pub read_only: bool,
    /// Logical block size in bytes: 512 or a larger power of two. Becomes
    /// `blk_size`; requests must be aligned to it.
    pub logical_block_size: u32,
    /// Physical block size in bytes: a power of two, at least the logical
    /// one. Becomes `physical_block_exp = log2(physical / logical)`.
    pub physical_block_size: u32,
    /// The disk can deallocate ranges (offer `DISCARD`).
    pub discard: bool,
    /// The disk can zero ranges (offer `WRITE_ZEROES`).
    pub write_zeroes: bool,
    /// Initial `writeback` (write cache enabled) of the config space.
    pub writeback: bool,
}

impl DiskInfo {
    /// A writable disk of `capacity_sectors` 512-byte sectors with 512-byte
    /// logical and physical blocks, no DISCARD or WRITE_ZEROES, and the
    /// write cache on.
    pub const fn new(capacity_sectors: u64) -> Self {
        DiskInfo {
            capacity_sectors,
            read_only: false,
            logical_block_size: SECTOR_SIZE,
            physical_block_size: SECTOR_SIZE,
            discard: false,
            write_zeroes: false,
            writeback: true,
        }
    }

    /// Checks the block sizes and the capacity.
    pub fn validate(&self) -> Result<(), DiskError> {
        let logical = self.logical_block_size;
        if !logical.is_power_of_two() || !(SECTOR_SIZE..=MAX_BLOCK_SIZE).contains(&logical) {
            return Err(DiskError::BadLogicalBlockSize { size: logical });
        }
        let physical = self.physical_block_size;
        if !physical.is_power_of_two() || !(logical..=MAX_BLOCK_SIZE).contains(&physical) {
            return Err(DiskError::BadPhysicalBlockSize { physical, logical });
        }
        if self.capacity_bytes().is_none() {
            return Err(DiskError::CapacityTooLarge {
                sectors: self.capacity_sectors,
            });
        }
        Ok(())
    }

    /// The size in bytes, or `None` when it does not fit in a `u64`.
    pub const fn capacity_bytes(&self) -> Option<u64> {
        self.capacity_sectors.checked_mul(SECTOR_SIZE as u64)
    }

    /// `log2(physical / logical)`, the config space's `physical_block_exp`;
    /// 0 for sizes [`validate`](Self::validate) refuses.
    pub const fn physical_block_exp(&self) -> u8 {
        if self.logical_block_size == 0 || self.physical_block_size < self.logical_block_size {
            return 0;
        }
        let ratio = self.physical_block_size / self.logical_block_size;
        // ilog2 of a non-zero u32 is at most 31.
        ratio.ilog2() as u8
    }

    /// DISCARD is offered: the disk supports it and is writable.
    pub const fn offers_discard(&self) -> bool {
        self.discard && !self.read_only
    }

    /// WRITE_ZEROES is offered: the disk supports it and is writable.
    pub const fn offers_write_zeroes(&self) -> bool {
        self.write_zeroes && !self.read_only
    }

    /// The logical block size in 512-byte sectors (at least 1).
    pub const fn sectors_per_block(&self) -> u32 {
        let sectors = self.logical_block_size / SECTOR_SIZE;
        if sectors == 0 { 1 } else { sectors }
    }
}

/// Why a [`DiskInfo`] cannot back a device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// The logical block size is not a power of two in 512..=64 KiB.
    #[error(
        "logical block size {size} is not a power of two between 512 and {MAX_BLOCK_SIZE} bytes"
    )]
    BadLogicalBlockSize {
        /// The configured size.
        size: u32,
    },
    /// The physical block size is not a power of two between the logical
    /// block size and 64 KiB.
    #[error(
        "physical block size {physical} is not a power of two between the logical block size {logical} and {MAX_BLOCK_SIZE} bytes"
    )]
    BadPhysicalBlockSize {
        /// The configured physical size.
        physical: u32,
        /// The configured logical size.
        logical: u32,
    },
    /// `capacity_sectors * 512` does not fit in a `u64`.
    #[error("capacity of {sectors} sectors does not fit in 64 bits of bytes")]
    CapacityTooLarge {
        /// The configured capacity.
        sectors: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_blocks(logical: u32, physical: u32) -> DiskInfo {
        DiskInfo {
            logical_block_size: logical,
            physical_block_size: physical,
            ..DiskInfo::new(8)
        }
    }

    #[test]
    fn default_disk_is_valid() {
        assert_eq!(DiskInfo::new(0).validate(), Ok(()));
        assert_eq!(DiskInfo::new(1 << 30).validate(), Ok(()));
    }

    #[test]
    fn power_of_two_block_sizes_are_valid() {
        assert_eq!(with_blocks(512, 4096).validate(), Ok(()));
        assert_eq!(with_blocks(4096, 4096).validate(), Ok(()));
        assert_eq!(
            with_blocks(MAX_BLOCK_SIZE, MAX_BLOCK_SIZE).validate(),
            Ok(())
        );
    }

    #[test]
    fn logical_block_size_below_512_or_not_a_power_of_two_is_refused() {
        for size in [
            0,
            1,
            256,
            511,
            513,
            1000,
            3 * 512,
            MAX_BLOCK_SIZE * 2,
            u32::MAX,
        ] {
            assert_eq!(
                with_blocks(size, MAX_BLOCK_SIZE).validate(),
                Err(DiskError::BadLogicalBlockSize { size }),
                "{size}"
            );
        }
    }

    #[test]
    fn physical_block_smaller_than_logical_or_odd_is_refused() {
        for physical in [0, 512, 2048, 4097, 6144, MAX_BLOCK_SIZE * 2] {
            assert_eq!(
                with_blocks(4096, physical).validate(),
                Err(DiskError::BadPhysicalBlockSize {
                    physical,
                    logical: 4096
                }),
                "{physical}"
            );
        }
    }

    #[test]
    fn capacity_whose_bytes_overflow_is_refused() {
        let sectors = u64::MAX / 512 + 1;
        assert_eq!(
            DiskInfo::new(sectors).validate(),
            Err(DiskError::CapacityTooLarge { sectors })
        );
        assert_eq!(DiskInfo::new(u64::MAX / 512).validate(), Ok(()));
    }

    #[test]
    fn physical_block_exp_is_log2_of_the_ratio() {
        assert_eq!(with_blocks(512, 512).physical_block_exp(), 0);
        assert_eq!(with_blocks(512, 4096).physical_block_exp(), 3);
        assert_eq!(with_blocks(4096, 16384).physical_block_exp(), 2);
        assert_eq!(with_blocks(4096, 512).physical_block_exp(), 0);
        assert_eq!(with_blocks(0, 512).physical_block_exp(), 0);
    }

    #[test]
    fn discard_and_write_zeroes_are_offered_only_on_a_writable_disk() {
        let able = DiskInfo {
            discard: true,
            write_zeroes: true,
            ..DiskInfo::new(8)
        };
        assert!(able.offers_discard() && able.offers_write_zeroes());
        let read_only = DiskInfo {
            read_only: true,
            ..able
        };
        assert!(!read_only.offers_discard() && !read_only.offers_write_zeroes());
        let unable = DiskInfo::new(8);
        assert!(!unable.offers_discard() && !unable.offers_write_zeroes());
    }

    #[test]
    fn sectors_per_block_counts_512_byte_sectors() {
        assert_eq!(with_blocks(512, 512).sectors_per_block(), 1);
        assert_eq!(with_blocks(4096, 4096).sectors_per_block(), 8);
        assert_eq!(with_blocks(0, 0).sectors_per_block(), 1);
    }
}
