//! Feature bits of the block device (virtio 1.2 §5.2.3) and the set the
//! device offers.
//!
//! The vhost-user `PROTOCOL_FEATURES` bit (30) belongs to the transport,
//! which adds it; it is not a device feature.

use crate::disk::DiskInfo;

/// `size_max` holds the largest size of one data segment.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// `seg_max` holds the largest number of data segments in one request.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// `geometry` holds a legacy disk geometry. Not offered.
pub const VIRTIO_BLK_F_GEOMETRY: u32 = 4;
/// The disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// `blk_size` holds the logical block size.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// The device accepts `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// `topology` holds the physical block layout.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
/// The driver may switch the write cache through `writeback`.
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
/// `num_queues` holds the number of request queues.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// The device accepts `VIRTIO_BLK_T_DISCARD`.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// The device accepts `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// Descriptors may point at indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// The `used_event`/`avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// virtio 1.0 or later (no legacy interface).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Buffer addresses go through the platform's IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// The mask of one feature bit.
pub const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Whether `feature` is set in `features`.
pub const fn has(features: u64, feature: u32) -> bool {
    features & bit(feature) != 0
}

/// The device features to offer for `disk`.
///
/// Always: `VERSION_1`, `SIZE_MAX`, `SEG_MAX`, `BLK_SIZE`, `TOPOLOGY`,
/// `FLUSH`, `CONFIG_WCE` (which requires `FLUSH`, §5.2.5.2), `MQ`, and the
/// ring's `INDIRECT_DESC` and `EVENT_IDX`. `RO` when the disk is read-only.
/// `DISCARD` and `WRITE_ZEROES` when the disk supports them **and is
/// writable**: both change the disk, so on a read-only disk every one of
/// them would fail. `ACCESS_PLATFORM` when `access_platform` is set (the
/// guest's DMA goes through a virtio-iommu).
pub fn offered_features(disk: &DiskInfo, access_platform: bool) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX);
    if disk.read_only {
        features |= bit(VIRTIO_BLK_F_RO);
    }
    if disk.offers_discard() {
        features |= bit(VIRTIO_BLK_F_DISCARD);
    }
    if disk.offers_write_zeroes() {
        features |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    if access_platform {
        features |= bit(VIRTIO_F_ACCESS_PLATFORM);
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALWAYS: [u32; 10] = [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
    ];

    fn disk() -> DiskInfo {
        DiskInfo::new(1 << 20)
    }

    #[test]
    fn plain_disk_gets_exactly_the_always_offered_features() {
        let expected = ALWAYS.iter().fold(0, |acc, &f| acc | bit(f));
        assert_eq!(offered_features(&disk(), false), expected);
    }

    #[test]
    fn geometry_and_protocol_features_are_never_offered() {
        let all = DiskInfo {
            discard: true,
            write_zeroes: true,
            ..disk()
        };
        let features = offered_features(&all, true);
        assert!(!has(features, VIRTIO_BLK_F_GEOMETRY));
        assert!(!has(features, 30), "PROTOCOL_FEATURES is the transport's");
    }

    #[test]
    fn read_only_disk_offers_ro_and_neither_discard_nor_write_zeroes() {
        let ro = DiskInfo {
            read_only: true,
            discard: true,
            write_zeroes: true,
            ..disk()
        };
        let features = offered_features(&ro, false);
        assert!(has(features, VIRTIO_BLK_F_RO));
        assert!(!has(features, VIRTIO_BLK_F_DISCARD));
        assert!(!has(features, VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(has(features, VIRTIO_BLK_F_FLUSH));
    }

    #[test]
    fn discard_and_write_zeroes_follow_the_disk_independently() {
        let discard = DiskInfo {
            discard: true,
            ..disk()
        };
        let features = offered_features(&discard, false);
        assert!(has(features, VIRTIO_BLK_F_DISCARD));
        assert!(!has(features, VIRTIO_BLK_F_WRITE_ZEROES));

        let zeroes = DiskInfo {
            write_zeroes: true,
            ..disk()
        };
        let features = offered_features(&zeroes, false);
        assert!(!has(features, VIRTIO_BLK_F_DISCARD));
        assert!(has(features, VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(!has(features, VIRTIO_BLK_F_RO));
    }

    #[test]
    fn access_platform_only_when_asked() {
        assert!(!has(
            offered_features(&disk(), false),
            VIRTIO_F_ACCESS_PLATFORM
        ));
        assert!(has(
            offered_features(&disk(), true),
            VIRTIO_F_ACCESS_PLATFORM
        ));
    }
}
