//! The virtio-net config space (virtio 1.2 §5.1.4) of one port.

use crate::mac::Mac;

/// `status`: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Config space bytes: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;

/// A port's config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest NIC's address.
    pub mac: Mac,
    /// The MTU the driver may use (frames up to mtu + 14, + 4 with a VLAN tag).
    pub mtu: u16,
}

impl NetConfig {
    /// The config space bytes.
    pub fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[..6].copy_from_slice(&self.mac.0);
        b[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// `size` bytes at `offset` (a read past the end gives nothing, as the
    /// VMM then reads zeros).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let b = self.bytes();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        b[start..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_sit_at_their_spec_offsets() {
        let c = NetConfig {
            mac: Mac([0x52, 0x54, 0, 1, 2, 3]),
            mtu: 1500,
        };
        assert_eq!(c.bytes(), [0x52, 0x54, 0, 1, 2, 3, 1, 0, 1, 0, 0xdc, 0x05]);
        assert_eq!(c.read(6, 2), vec![1, 0]);
        assert_eq!(c.read(10, 100), vec![0xdc, 0x05]);
        assert!(c.read(12, 4).is_empty());
        assert!(c.read(u32::MAX, u32::MAX).is_empty());
    }
}
