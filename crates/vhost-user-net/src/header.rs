//! The 12-byte `virtio_net_hdr` that precedes every frame (virtio 1.2
//! §5.1.6, VERSION_1 layout): flags, gso_type, hdr_len, gso_size,
//! csum_start, csum_offset, num_buffers.

/// Header bytes.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers`.
const NUM_BUFFERS_AT: usize = 10;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Why a transmitted header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// `flags` set (NEEDS_CSUM, DATA_VALID...): no checksum offload was
    /// negotiated.
    #[error("header flags {0:#x} without a checksum offload negotiated")]
    Flags(u8),
    /// `gso_type` other than NONE: no segmentation offload was negotiated.
    #[error("gso_type {0:#x} without a segmentation offload negotiated")]
    Gso(u8),
}

/// Checks a transmitted header: with no offload negotiated, a driver
/// must send flags 0 and gso_type NONE (§5.1.6.2.1); anything else asks
/// for work the switch does not do, so the frame is dropped rather than
/// forwarded wrong.
pub fn check_tx(hdr: &[u8; HDR_LEN]) -> Result<(), HeaderError> {
    if hdr[0] != 0 {
        return Err(HeaderError::Flags(hdr[0]));
    }
    if hdr[1] != 0 {
        return Err(HeaderError::Gso(hdr[1]));
    }
    Ok(())
}

/// Makes a transmitted header the received one: offload fields carried
/// through (all zero, see [`check_tx`]), `num_buffers` set.
pub fn set_num_buffers(hdr: &mut [u8], n: u16) {
    if let Some(b) = hdr.get_mut(NUM_BUFFERS_AT..HDR_LEN) {
        b.copy_from_slice(&n.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_header_without_offloads_is_forwarded() {
        let mut h = [0u8; HDR_LEN];
        assert_eq!(check_tx(&h), Ok(()));
        h[10] = 7; // num_buffers is ignored on transmit
        assert_eq!(check_tx(&h), Ok(()));
        h[0] = 1;
        assert_eq!(check_tx(&h), Err(HeaderError::Flags(1)));
        h[0] = 0;
        h[1] = 0x80;
        assert_eq!(check_tx(&h), Err(HeaderError::Gso(0x80)));
    }

    #[test]
    fn num_buffers_is_little_endian_at_offset_10() {
        let mut h = [0xaau8; HDR_LEN];
        set_num_buffers(&mut h, 0x0102);
        assert_eq!(&h[10..], &[2, 1]);
        assert_eq!(&h[..10], &[0xaa; 10]);
        let mut short = [0u8; 4];
        set_num_buffers(&mut short, 1);
        assert_eq!(short, [0; 4]);
    }
}
