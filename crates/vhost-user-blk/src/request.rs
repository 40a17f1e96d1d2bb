//! The request header, the request types and the status byte
//! (virtio 1.2 §5.2.6).

/// The protocol's sector: offsets and capacities count 512-byte units.
pub const SECTOR_SIZE: u32 = 512;
/// Bytes of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: usize = 16;

/// Read sectors into the device-writable data.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write the device-readable data to sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Make every completed write stable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Fetch the device ID string (serial).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Fetch the device lifetime. Not supported here.
pub const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;
/// Deallocate the ranges listed in the data.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Zero the ranges listed in the data.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Securely erase the ranges listed in the data. Not supported here.
pub const VIRTIO_BLK_T_SECURE_ERASE: u32 = 14;

/// The device-readable header at the start of every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// The request type (`VIRTIO_BLK_T_*`; anything else is unsupported).
    pub kind: u32,
    /// First 512-byte sector, for IN and OUT; unused by the others.
    pub sector: u64,
}

impl RequestHeader {
    /// Parses the 16 little-endian header bytes; `reserved` (bytes 4..8) is
    /// ignored.
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Self {
        let [k0, k1, k2, k3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = *bytes;
        RequestHeader {
            kind: u32::from_le_bytes([k0, k1, k2, k3]),
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        }
    }
}

/// The status byte the device writes last (`VIRTIO_BLK_S_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Device or driver error.
    IoErr = 1,
    /// The request is not supported by the device.
    Unsupp = 2,
}

impl Status {
    /// The byte written to the status location.
    pub const fn as_byte(self) -> u8 {
        self as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_little_endian_at_0_and_8_and_reserved_is_ignored() {
        let bytes = [
            0x0d, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
        ];
        assert_eq!(
            RequestHeader::from_bytes(&bytes),
            RequestHeader {
                kind: VIRTIO_BLK_T_WRITE_ZEROES,
                sector: 0x0807_0605_0403_0201,
            }
        );
    }

    #[test]
    fn header_keeps_unknown_types_and_high_type_bits() {
        let mut bytes = [0; HEADER_LEN];
        bytes[..4].copy_from_slice(&0x8000_0001u32.to_le_bytes());
        bytes[8..].copy_from_slice(&u64::MAX.to_le_bytes());
        let header = RequestHeader::from_bytes(&bytes);
        assert_eq!(header.kind, 0x8000_0001);
        assert_eq!(header.sector, u64::MAX);
    }

    #[test]
    fn status_bytes_match_the_spec() {
        assert_eq!(Status::Ok.as_byte(), 0);
        assert_eq!(Status::IoErr.as_byte(), 1);
        assert_eq!(Status::Unsupp.as_byte(), 2);
    }
}
