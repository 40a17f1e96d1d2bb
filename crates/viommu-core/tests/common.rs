//! Shared harness for the conformance tests: a device with a small endpoint
//! set, driven through `Device::process` exactly as a transport would.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use viommu_core::{
    Access, ChangeLog, Device, DeviceConfig, EndpointRange, TranslateError, Translation,
};
use virtio_iommu_proto::config::{DomainRange, InputRange};
use virtio_iommu_proto::{Attach, Detach, Features, Map, MapFlags, Probe, Request, Status, Unmap};

/// The reserved regions of the conformance endpoints: the reference
/// model's fixture.
pub use viommu_core::reference::fixture::{MSI, MSI_ARM, RESERVED};
pub const PROBE_SIZE: usize = 512;
pub const RW: MapFlags = MapFlags(3);
pub const R: MapFlags = MapFlags::READ;
pub const W: MapFlags = MapFlags::WRITE;
pub const UNKNOWN_EP: u32 = 5000;

/// Endpoints 0–7 reserve the x86 MSI window; 8–9 reserve a RESERVED region
/// and an MSI window at the Arm address; 100 reserves nothing.
pub fn test_config() -> DeviceConfig {
    DeviceConfig {
        endpoints: vec![
            EndpointRange {
                first: 0,
                last: 7,
                resv: vec![MSI],
            },
            EndpointRange {
                first: 8,
                last: 9,
                resv: vec![RESERVED, MSI_ARM],
            },
            EndpointRange {
                first: 100,
                last: 100,
                resv: vec![],
            },
        ],
        page_size_mask: 0x1000,
        input_range: Some(InputRange {
            start: 0,
            end: (1 << 48) - 1,
        }),
        domain_range: Some(DomainRange {
            start: 0,
            end: 1023,
        }),
        probe_size: Some(PROBE_SIZE as u32),
        mmio: true,
        bypass_config: true,
        legacy_bypass: false,
        initial_bypass: false,
        limits: Default::default(),
    }
}

pub struct Harness {
    pub dev: Device,
    pub log: ChangeLog,
}

/// A device as a driver sees it after FEATURES_OK with `features` acked.
pub fn harness_with(cfg: DeviceConfig, features: Option<Features>) -> Harness {
    let mut dev = Device::new(cfg).unwrap();
    let mut log = ChangeLog::default();
    let f = features.unwrap_or(dev.offered_features());
    dev.set_features(f, &mut log).unwrap();
    Harness { dev, log }
}

/// The test config with every offered feature acked.
pub fn harness() -> Harness {
    harness_with(test_config(), None)
}

/// Used length and the bytes of a writable part after one request.
pub struct Outcome {
    pub used_len: u32,
    pub writable: Vec<u8>,
}

impl Outcome {
    /// The status in the tail at `offset`.
    pub fn status_at(&self, offset: usize) -> Option<Status> {
        Status::from_u8(self.writable[offset])
    }
}

impl Harness {
    /// Sends raw readable bytes with a writable part of `writable_len`
    /// bytes pre-filled with 0xAA, and applies the reply to it.
    pub fn raw(&mut self, readable: &[u8], writable_len: usize) -> Outcome {
        let mut writable = vec![0xaa; writable_len];
        let reply = self.dev.process(readable, writable_len, &mut self.log);
        let bytes = reply.to_bytes();
        assert!(
            bytes.len() <= writable_len,
            "reply longer than the writable part"
        );
        assert_eq!(bytes.len() as u32, reply.used_len());
        writable[..bytes.len()].copy_from_slice(&bytes);
        Outcome {
            used_len: reply.used_len(),
            writable,
        }
    }

    /// Sends a request with an exactly sized writable part, checks the used
    /// length and tail bytes every completed request must have, and returns
    /// the status.
    pub fn send(&mut self, req: Request) -> Status {
        let writable_len = match req {
            Request::Probe(_) => PROBE_SIZE + 4,
            _ => 4,
        };
        let out = self.raw(&req.encode(), writable_len);
        assert_eq!(out.used_len as usize, writable_len, "DEV-GEN-2 used length");
        let tail = &out.writable[writable_len - 4..];
        assert_eq!(&tail[1..], &[0, 0, 0], "DEV-OPS-4 tail reserved");
        Status::from_u8(tail[0]).unwrap()
    }

    pub fn attach(&mut self, domain: u32, endpoint: u32) -> Status {
        self.send(Request::Attach(Attach {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        }))
    }

    pub fn attach_bypass(&mut self, domain: u32, endpoint: u32) -> Status {
        self.send(Request::Attach(Attach {
            domain,
            endpoint,
            flags: 1,
            reserved: [0; 4],
        }))
    }

    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
        self.send(Request::Detach(Detach { domain, endpoint }))
    }

    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    ) -> Status {
        self.send(Request::Map(Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        }))
    }

    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Status {
        self.send(Request::Unmap(Unmap {
            domain,
            virt_start,
            virt_end,
            reserved: [0; 4],
        }))
    }

    /// PROBE with an exact writable part: (status, properties area).
    pub fn probe(&mut self, endpoint: u32) -> (Status, Vec<u8>) {
        let out = self.raw(&Request::Probe(Probe { endpoint }).encode(), PROBE_SIZE + 4);
        assert_eq!(out.used_len as usize, PROBE_SIZE + 4);
        (
            out.status_at(PROBE_SIZE).unwrap(),
            out.writable[..PROBE_SIZE].to_vec(),
        )
    }

    pub fn xlate(
        &self,
        endpoint: u32,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        self.dev.translate(endpoint, iova, access)
    }

    /// The guest-physical address, or `None` if the access faults.
    pub fn gpa(&self, endpoint: u32, iova: u64, access: Access) -> Option<u64> {
        self.xlate(endpoint, iova, access).ok().map(|t| t.gpa)
    }
}
