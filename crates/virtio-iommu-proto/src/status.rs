//! Request status codes written into the tail.

/// `virtio_iommu_req_tail.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Virtio communication error.
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out-of-range parameters.
    Range = 5,
    /// Entry not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

impl Status {
    /// The status for a wire byte, if it is a defined one.
    pub const fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::IoErr,
            2 => Status::Unsupp,
            3 => Status::DevErr,
            4 => Status::Inval,
            5 => Status::Range,
            6 => Status::NoEnt,
            7 => Status::Fault,
            8 => Status::NoMem,
            _ => return None,
        })
    }

    /// The spec's name of the status, for logs.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::IoErr => "IOERR",
            Status::Unsupp => "UNSUPP",
            Status::DevErr => "DEVERR",
            Status::Inval => "INVAL",
            Status::Range => "RANGE",
            Status::NoEnt => "NOENT",
            Status::Fault => "FAULT",
            Status::NoMem => "NOMEM",
        }
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_values_match_the_spec_table() {
        for v in 0u8..=255 {
            match Status::from_u8(v) {
                Some(s) => assert_eq!(s as u8, v),
                None => assert!(v > 8),
            }
        }
        assert_eq!(Status::NoMem as u8, 8);
        assert_eq!(Status::Range.to_string(), "RANGE");
    }
}
