//! virtio-net feature bits (virtio 1.2 §5.1.3) and what the switch offers.
//!
//! No checksum or segmentation offload is offered: frames are copied as
//! they are, so the driver computes checksums and segments itself.

/// The device has a maximum MTU (config `mtu`).
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// The device has a MAC address (config `mac`).
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// The driver can merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// Config `status` is available.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// A control queue.
pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
/// RX mode control (promiscuous, all-multicast) and the MAC filter table.
pub const VIRTIO_NET_F_CTRL_RX: u32 = 18;
/// Indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Used and available event indices.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// virtio 1.x.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Device addresses go through the platform's IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Checksum offload to the device (never offered).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// TCP segmentation offload to the device (never offered).
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;

/// The bit of feature `n`.
pub const fn bit(n: u32) -> u64 {
    1 << n
}

/// The features a port offers; ACCESS_PLATFORM when its DMA goes through
/// an IOMMU.
pub fn offered_features(translates: bool) -> u64 {
    let mut f = bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_F_VERSION_1);
    if translates {
        f |= bit(VIRTIO_F_ACCESS_PLATFORM);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_are_never_offered_and_access_platform_follows_the_iommu() {
        for translates in [false, true] {
            let f = offered_features(translates);
            assert_eq!(f & bit(VIRTIO_NET_F_CSUM), 0);
            assert_eq!(f & bit(VIRTIO_NET_F_HOST_TSO4), 0);
            assert_ne!(f & bit(VIRTIO_F_VERSION_1), 0);
            assert_eq!(f & bit(VIRTIO_F_ACCESS_PLATFORM) != 0, translates);
        }
    }
}
