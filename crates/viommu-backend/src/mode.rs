//! How a backend's device addresses are translated (`--iommu MODE`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The translation mode of a backend's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IommuMode {
    /// No IOMMU: descriptor and ring addresses are guest-physical (the usual
    /// vhost-user backend).
    None,
    /// Addresses are IOVAs of the device's endpoint, translated through the
    /// shared table of the `vhost-user-iommu` daemon at this backend socket.
    Table(PathBuf),
    /// Addresses are IOVAs, translated through a private IOTLB filled by
    /// request/reply messages on this backend socket and invalidated by the
    /// daemon (today's vhost-user design, as a baseline).
    IotlbMsg(PathBuf),
}

/// A `--iommu` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--iommu {0:?}: expected none, table:SOCKET or iotlb-msg:SOCKET")]
pub struct ModeError(pub String);

impl FromStr for IommuMode {
    type Err = ModeError;

    fn from_str(s: &str) -> Result<Self, ModeError> {
        let path = |p: &str| {
            if p.is_empty() {
                Err(ModeError(s.to_string()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s.split_once(':') {
            None if s == "none" => Ok(IommuMode::None),
            Some(("table", p)) => path(p).map(IommuMode::Table),
            Some(("iotlb-msg", p)) => path(p).map(IommuMode::IotlbMsg),
            _ => Err(ModeError(s.to_string())),
        }
    }
}

impl fmt::Display for IommuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IommuMode::None => f.write_str("none"),
            IommuMode::Table(p) => write!(f, "table:{}", p.display()),
            IommuMode::IotlbMsg(p) => write!(f, "iotlb-msg:{}", p.display()),
        }
    }
}

impl IommuMode {
    /// Whether device addresses are IOVAs (the device offers
    /// VIRTIO_F_ACCESS_PLATFORM).
    pub fn translates(&self) -> bool {
        !matches!(self, IommuMode::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_parses_and_prints_back() {
        for s in ["none", "table:/run/viommu.sock", "iotlb-msg:/tmp/b.sock"] {
            let m: IommuMode = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(m.to_string(), s);
        }
        assert!(!IommuMode::None.translates());
        assert!(IommuMode::Table("x".into()).translates());
    }

    #[test]
    fn bad_modes_are_refused_with_the_value_named() {
        for s in [
            "",
            "table",
            "table:",
            "iotlb-msg:",
            "Table:/x",
            "nope",
            "none:/x",
        ] {
            let e = s.parse::<IommuMode>().unwrap_err();
            assert_eq!(e.0, s);
        }
    }
}
