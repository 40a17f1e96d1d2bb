//! The device ID string GET_ID returns (virtio 1.2 §5.2.6: "a NUL-padded
//! ASCII string up to 20 bytes long", with no terminator at 20 bytes).

/// Bytes of the device ID string.
pub const ID_BYTES: usize = 20;

/// `serial` as GET_ID returns it: its first 20 bytes, padded with NULs.
/// A serial of 20 bytes or more has no NUL.
pub fn id_bytes(serial: &str) -> [u8; ID_BYTES] {
    let mut id = [0; ID_BYTES];
    let len = serial.len().min(ID_BYTES);
    id[..len].copy_from_slice(&serial.as_bytes()[..len]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_serial_is_nul_padded() {
        let id = id_bytes("disk0");
        assert_eq!(&id[..5], b"disk0");
        assert!(id[5..].iter().all(|&b| b == 0));
    }

    #[test]
    fn empty_serial_is_all_nuls() {
        assert_eq!(id_bytes(""), [0; ID_BYTES]);
    }

    #[test]
    fn twenty_byte_serial_has_no_terminator() {
        assert_eq!(&id_bytes("ABCDEFGHIJKLMNOPQRST"), b"ABCDEFGHIJKLMNOPQRST");
    }

    #[test]
    fn longer_serial_is_truncated_at_twenty_bytes() {
        assert_eq!(
            &id_bytes("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            b"ABCDEFGHIJKLMNOPQRST"
        );
    }
}
