//! Ethernet MAC addresses.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

/// The broadcast address.
pub const BROADCAST: Mac = Mac([0xff; 6]);

impl Mac {
    /// Group (multicast or broadcast) address: bit 0 of the first byte.
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The destination address of an Ethernet frame (its first 6 bytes).
    pub fn destination_of(frame: &[u8]) -> Option<Mac> {
        frame.get(..6)?.try_into().ok().map(Mac)
    }

    /// The source address of an Ethernet frame (bytes 6..12).
    pub fn source_of(frame: &[u8]) -> Option<Mac> {
        frame.get(6..12)?.try_into().ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MAC address that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "MAC address {0:?}: expected six hexadecimal bytes separated by colons (52:54:00:12:34:56)"
)]
pub struct MacError(pub String);

impl FromStr for Mac {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Mac, MacError> {
        let bad = || MacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_print_and_classify() {
        let m: Mac = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!(!m.is_group());
        assert!(BROADCAST.is_group());
        assert!("01:00:5e:00:00:01".parse::<Mac>().unwrap().is_group());
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
            "525400abcd01",
        ] {
            assert_eq!(bad.parse::<Mac>(), Err(MacError(bad.to_string())), "{bad}");
        }
        let frame = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x88, 0xb5];
        assert_eq!(Mac::destination_of(&frame), Some(Mac([1, 2, 3, 4, 5, 6])));
        assert_eq!(Mac::source_of(&frame), Some(Mac([7, 8, 9, 10, 11, 12])));
        assert_eq!(Mac::source_of(&frame[..11]), None);
    }
}
